"""Distilling the uncompressed-trained ranker into JPQ full: held-out selection runs.

    python bench/teacher_distill.py                          # 96x, seeds 0-2, weight 1
    python bench/teacher_distill.py --seeds 0 --weights 0.5,2

`uncompressed-trained` (the same trainer with an identity index) is the reference JPQ is judged
against. Its query tower ranks the true document vectors; JPQ's tower ranks compressed ones.
Here JPQ full gets one more term per step: the KL divergence from the teacher's softmax over the
step's candidates (the positives and the hard negatives the current compressed index returns),
scored by the teacher's query vector against the *uncompressed* document vectors, to the
student's softmax over the same candidates (both at the trainer's logit scale):

    loss += weight * KL(softmax(scale * q_teacher . x) || softmax(scale * q_student . x_hat))

Soft targets over ~100 candidates per query, from a ranker that has seen the same labels,
rather than the one positive alone (Distill-VQ distils a dense teacher into PQ this way).

No leak into the held-out score: the teacher is the uncompressed-trained *selection* run of the
same seed (trained on the same four fifths of the train split, its epoch chosen on the same
held-out fifth, no refit), so it has never trained on a held-out query. The test split is never
read. Each row is the demo's JPQ full selection run at the demo's 96x choice (centroid rate 1e-3,
pseudo-query weight 1): held-out nDCG@10 of the selected epoch, the unseen-positive held-out
queries, seconds. Weight 0 is the demo's run. Writes bench/results/teacher_distill.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, command_line, cpu_model  # noqa: E402


def distill_trainer_class(teacher_q: dict, weight: float):
    from jpq.train import JPQTrainer

    class TeacherDistilled(JPQTrainer):
        """JPQTrainer whose step adds weight * KL(teacher || student) over the step's candidates."""

        def step(self, ids):
            # the base step, with the teacher term added to its loss: re-implemented here so that
            # the candidates are drawn once (the base step draws them itself)
            from jpq.train import ce_loss, pairwise_loss

            q = self._queries(ids, grad=self.train_encoder)
            cand, pos_mask, valid = self._candidates(ids, q)
            scores, recon = self._scores(q, cand)
            logits = self.cfg.scale * scores
            rank_loss = (ce_loss if self.cfg.loss == "ce" else pairwise_loss)(logits, pos_mask, valid)
            loss = rank_loss + self.cfg.recon_weight * recon
            with torch.no_grad():
                tq = torch.from_numpy(np.stack([teacher_q[i] for i in ids])).to(self.device)
                t_scores = torch.einsum("bd,bpd->bp", tq, self.X_t[torch.from_numpy(cand).to(self.device)])
                neg_inf = torch.finfo(t_scores.dtype).min
                t_logp = F.log_softmax((self.cfg.scale * t_scores).masked_fill(~valid, neg_inf), 1)
            s_logp = F.log_softmax(logits.masked_fill(~valid, torch.finfo(logits.dtype).min), 1)
            kl = (t_logp.exp() * (t_logp - s_logp)).masked_fill(~valid, 0.0).sum(1).mean()
            loss = loss + weight * kl
            corpus_recon = self._corpus_recon()
            if corpus_recon is not None:
                loss = loss + self.cfg.corpus_recon_weight * corpus_recon
            pseudo = self._pseudo_query_loss()
            if pseudo is not None:
                loss = loss + self.cfg.pseudo_query_weight * pseudo
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            return {"loss": float(loss.detach()), "rank_loss": float(rank_loss.detach()),
                    "recon": float(recon.detach()), "kl": float(kl.detach()),
                    "corpus_recon": 0.0 if corpus_recon is None else float(corpus_recon.detach()),
                    "pseudo": 0.0 if pseudo is None else float(pseudo.detach())}

    return TeacherDistilled


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--embeddings", default=None)
    ap.add_argument("--ratio", type=int, default=96)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--weights", default="0,1")
    ap.add_argument("--lr-centroids", type=float, default=1e-3)
    ap.add_argument("--pseudo-query-weight", type=float, default=1.0)
    ap.add_argument("--out", default=str(RESULTS / "teacher_distill.md"))
    args = ap.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")]

    from jpq.pipeline import build_index, load_workspace, m_for_ratio, train_run
    from jpq.train import TrainConfig

    ws = load_workspace(args.data, embeddings=args.embeddings, progress=False)
    rows = dict(zip(ws.dataset.query_ids, ws.query_emb))
    t_all = time.perf_counter()
    records = []
    lines = [f"# Distilling uncompressed-trained into JPQ full ({ws.dataset.name}, {args.ratio}x)", "",
             f"JPQ full selection runs: held-out fifth of the train split, centroid rate {args.lr_centroids:g}, "
             f"pseudo-query weight {args.pseudo_query_weight:g}, no refit; teacher: the uncompressed-trained "
             "selection run of the same seed; test split never read.", "",
             "| seed | KL weight | held-out nDCG@10 (epoch) | unseen-positive held-out | seconds |",
             "|---|---|---|---|---|"]
    for seed in (int(s) for s in args.seeds.split(",")):
        teacher, t_secs, t_sel = train_run(ws, TrainConfig(mode="encoder", seed=seed), None, None,
                                           progress=False, select_only=True)
        ids = ws.train_ids()
        t_vecs = np.concatenate([teacher._encode_eval(ids[s : s + 256]).float().cpu().numpy()
                                 for s in range(0, len(ids), 256)])
        teacher_q = dict(zip(ids, t_vecs))
        print(f"seed {seed}: teacher held-out {t_sel.best_score:.4f} (epoch {t_sel.best_epoch}), {t_secs:.0f} s",
              flush=True)
        index = build_index(ws.doc_emb, m_for_ratio(ws.d, args.ratio), opq=True, seed=seed)
        for w in weights:
            cfg = TrainConfig(mode="jpq", lr_centroids=args.lr_centroids,
                              pseudo_query_weight=args.pseudo_query_weight, seed=seed)
            t0 = time.perf_counter()
            if w == 0:
                trainer, _, sel = train_run(ws, cfg, index, None, progress=False, select_only=True)
            else:
                cls = distill_trainer_class(teacher_q, w)
                trainer = cls(cfg, ws.doc_emb, copy.deepcopy(index), ids, ws.train_qrels_by_row(),
                              query_texts=ws.query_texts(), query_embeddings=rows,
                              encoder=copy.deepcopy(ws.encoder), out_dir=None, progress=False,
                              pseudo_queries=ws.pseudo_query_emb(progress=False)
                              if args.pseudo_query_weight > 0 else None)
                trainer.fit()
                sel = trainer.state
            secs = time.perf_counter() - t0
            best = sel.history[sel.best_epoch]
            unseen = best.get("val_unseen")
            unseen = float(np.mean(unseen)) if isinstance(unseen, list) else unseen
            rec = {"seed": seed, "weight": w, "val": float(sel.best_score), "epoch": sel.best_epoch,
                   "val_unseen": unseen, "seconds": secs, "teacher_val": float(t_sel.best_score),
                   "curve": [h.get("val") for h in sel.history]}
            records.append(rec)
            lines.append(f"| {seed} | {w:g} | {rec['val']:.4f} ({rec['epoch']}) | "
                         f"{'-' if unseen is None else f'{unseen:.4f}'} | {secs:.0f} |")
            print(lines[-1], flush=True)
    lines += ["", "Mean held-out nDCG@10 per KL weight:"]
    for w in weights:
        vals = [r["val"] for r in records if r["weight"] == w]
        lines.append(f"- {w:g}: {np.mean(vals):.4f} ({', '.join(f'{x:.4f}' for x in vals)})")
    lines += ["", f"Command: `{command_line(__file__, argv)}` ({time.perf_counter() - t_all:.0f} s on {cpu_model()})."]
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
