"""Pseudo-queries through the query tower being trained, or fixed: held-out selection runs.

    python bench/pseudo_query_tower.py                       # JPQ full, 96x, seeds 0-2, ~30 min
    python bench/pseudo_query_tower.py --variants tower --seeds 0

The demo's pseudo-query term (`TrainConfig.pseudo_query_weight`) scores each document's title,
embedded once by the *frozen* encoder, against the current index: the centroids learn to rank
the document first for it. In JPQ full the query tower moves during training, so the titles the
centroids are fitted to are not what the trained tower would make of them. Variants:

- `frozen`: the demo's term as it is (cached zero-shot title vectors);
- `tower`: the step's titles embedded by the current tower (eval mode, no gradient): the
  centroids fit what the trained tower sees; about 32 short texts more per step, forward only;
- `tower-grad`: the same with gradients into the tower too (it also learns to map a title to its
  document's compressed vector): a second forward and backward pass per step.

Each is the demo's selection run (`jpq.pipeline.train_run(..., select_only=True)`: the trainer's
own held-out fifth of the train split, no refit; the test split is never read) on the OPQ index,
centroid rate 1e-3 and pseudo-query weight 1 (the demo's choice at 96x on seeds 0, 1 and 2).
Reports the selected held-out nDCG@10, its epoch, the held-out queries whose positives no
training query points to, and seconds. Writes bench/results/pseudo_query_tower.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, add_selection_row, mean_lines, write_report  # noqa: E402

VARIANTS = ("frozen", "tower", "tower-grad")


def tower_trainer_class(texts: list[str], grad: bool):
    from jpq.train import JPQTrainer, ce_loss

    class TowerPseudoQueries(JPQTrainer):
        """JPQTrainer whose pseudo-queries are the titles through the current query tower."""

        def _pseudo_query_loss(self):
            if self.pseudo_queries is None:
                return None
            n = min(self.cfg.pseudo_queries_per_step, len(self.X))
            rows = torch.randperm(len(self.X))[:n]  # the same draw as the frozen term
            batch = [texts[r] for r in rows.tolist()]
            if grad:
                q = self.encoder(batch)
            else:
                with torch.no_grad():
                    was = self.encoder.training
                    self.encoder.eval()
                    q = self.encoder(batch)
                    self.encoder.train(was)
            cand, pos_mask, valid = self._candidates_for([[d] for d in rows.tolist()], q)
            scores, _ = self._scores(q, cand, recon=False)
            return ce_loss(self.cfg.scale * scores, pos_mask, valid)

    return TowerPseudoQueries


def selection_run(ws, index, cfg, variant: str):
    from jpq.data import title_queries
    from jpq.pipeline import train_run
    from jpq.train import JPQTrainer

    cls = JPQTrainer if variant == "frozen" else \
        tower_trainer_class(title_queries(ws.dataset), grad=variant == "tower-grad")
    return train_run(ws, cfg, index, None, progress=False, select_only=True, trainer_class=cls)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--ratio", type=int, default=96)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(RESULTS / "pseudo_query_tower.md"))
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; expected some of {VARIANTS}")

    from jpq.pipeline import build_index, load_workspace, m_for_ratio
    from jpq.train import TrainConfig

    ws = load_workspace(args.data, progress=False)
    t_all = time.perf_counter()
    records = []
    lines = [f"# Pseudo-queries through the trained query tower vs fixed ({ws.dataset.name}, {args.ratio}x)", "",
             "JPQ full selection runs: held-out fifth of the train split, centroid rate 1e-3, pseudo-query "
             "weight 1, no refit; test split never read.", "",
             "| seed | variant | held-out nDCG@10 (epoch) | unseen-positive held-out | seconds |", "|---|---|---|---|---|"]
    for seed in (int(s) for s in args.seeds.split(",")):
        index = build_index(ws.doc_emb, m_for_ratio(ws.d, args.ratio), opq=True, seed=seed)
        for variant in variants:
            cfg = TrainConfig(mode="jpq", lr_centroids=1e-3, pseudo_query_weight=1.0, seed=seed)
            trainer, secs, sel = selection_run(ws, index, cfg, variant)
            add_selection_row(lines, records, f"{seed} | {variant}", sel, secs, seed=seed, variant=variant)
    lines += mean_lines(records, "variant", "Mean held-out nDCG@10 per variant:")
    write_report(Path(args.out), lines, records, __file__, argv, t_all)


if __name__ == "__main__":
    main()
