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
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, add_selection_row, mean_lines, write_report  # noqa: E402


def distill_trainer_class(teacher_q: dict, weight: float):
    from jpq.train import JPQTrainer

    class TeacherDistilled(JPQTrainer):
        """JPQTrainer whose step adds weight * KL(teacher || student) over the step's candidates."""

        def _extra_loss(self, ids, cand, valid, logits):
            with torch.no_grad():
                tq = torch.from_numpy(np.stack([teacher_q[i] for i in ids])).to(self.device)
                t_scores = torch.einsum("bd,bpd->bp", tq, self.X_t[torch.from_numpy(cand).to(self.device)])
                neg_inf = torch.finfo(t_scores.dtype).min
                t_logp = F.log_softmax((self.cfg.scale * t_scores).masked_fill(~valid, neg_inf), 1)
            s_logp = F.log_softmax(logits.masked_fill(~valid, torch.finfo(logits.dtype).min), 1)
            kl = (t_logp.exp() * (t_logp - s_logp)).masked_fill(~valid, 0.0).sum(1).mean()
            return weight * kl

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
    from jpq.train import JPQTrainer, TrainConfig

    ws = load_workspace(args.data, embeddings=args.embeddings, progress=False)
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
            cls = JPQTrainer if w == 0 else distill_trainer_class(teacher_q, w)
            _, secs, sel = train_run(ws, cfg, index, None, progress=False, select_only=True, trainer_class=cls)
            add_selection_row(lines, records, f"{seed} | {w:g}", sel, secs, seed=seed, weight=w,
                              teacher_val=float(t_sel.best_score))
    lines += mean_lines(records, "weight", "Mean held-out nDCG@10 per KL weight:")
    write_report(Path(args.out), lines, records, __file__, argv, t_all)


if __name__ == "__main__":
    main()
