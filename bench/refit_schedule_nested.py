"""The refit's length and learning-rate schedule: a nested hold-out on the train split.

    python bench/refit_schedule_nested.py [--seeds 0,1,2] [--ratio 96]     # ~13 min per seed

The trainer keeps both learning rates constant. The refit knows how many epochs it will run (the
count the selection run chose), so it could decay them to 0 by its end, as fine-tuning recipes
usually do: the last updates are then small, and a score that two batch orders move by about 0.01
(bench/results/refit_soup_nested.md) may settle. Per seed and per batch order (the seed's own and
seed + 1000), the refit on the inner 80% of the train split (`holdout_split`, seed 123) runs:

  constant       E epochs at constant rates (the demo's refit);
  step-matched   round(0.75 E) epochs at constant rates: as many steps as the selection run took
                 to reach its selected epoch (it trained on three quarters of the inner queries);
  constant 1.5x  round(1.5 E) epochs at constant rates;
  linear         E epochs, both rates decayed linearly per epoch, epoch e at (E - e + 0.5) / E;
  linear 2x      2 E epochs, decayed the same way over them (the same summed step size as the
                 constant refit: its mean rate is half).

E, the selection run's epoch count, and the constant refits come from --soup-cache
(bench/refit_soup_nested.py, same inner/outer split and settings) when present, else are run here.
Each refit is scored on the outer 20%: nDCG@10 on all outer queries and on the unseen ones (no
inner query points to their positives). The test split is never read.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (RESULTS, NestedHoldout, add_nested_run_args, outer_score_rows,  # noqa: E402
                     read_cache, write_cached_report)

# name: (epochs as a multiple of E, rates decayed linearly to 0 over them)
VARIANTS = {"constant": (1.0, False), "step-matched": (0.75, False), "constant 1.5x": (1.5, False),
            "linear": (1.0, True), "linear 2x": (2.0, True)}


def decayed_trainer():
    """A JPQTrainer whose learning rates decay linearly over cfg.epochs, per epoch: epoch e (from
    1) runs at (epochs - e + 0.5) / epochs of each group's initial rate."""
    from jpq.train import JPQTrainer

    class LinearDecay(JPQTrainer):
        def _train_epoch(self, epoch):
            for g in self.optimizer.param_groups:
                g.setdefault("initial_lr", g["lr"])
                g["lr"] = g["initial_lr"] * (self.cfg.epochs - epoch + 0.5) / self.cfg.epochs
            return super()._train_epoch(epoch)

    return LinearDecay


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nested_run_args(ap, "refit_schedule_nested")
    ap.add_argument("--soup-cache", default=str(RESULTS / "refit_soup_nested.json"))
    args = ap.parse_args(argv)

    from jpq.pipeline import build_index, m_for_ratio
    from jpq.storage import atomic_write_json
    from jpq.train import TrainConfig

    cache = Path(args.cache)
    res = read_cache(cache)
    soup = read_cache(args.soup_cache)
    nested = NestedHoldout(args.data, args.embeddings, pseudo_queries=args.pseudo_query_weight > 0)
    ws = nested.ws
    t_all = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        soup_run = soup.get(f"s{seed} {args.ratio}x", {})
        keys = {f"s{seed} {args.ratio}x order {order}": (order, name)
                for order, name in ((seed, "refit"), (seed + 1000, "refit'"))}
        todo = {key: [v for v in VARIANTS if v not in res.get(key, {}) and not (v == "constant" and name in soup_run)]
                for key, (order, name) in keys.items()}
        if not any(todo.values()):
            continue
        index = build_index(ws.doc_emb, m_for_ratio(ws.d, args.ratio), opq=True, seed=seed)
        cfg = TrainConfig(mode="jpq", lr_centroids=args.lr_centroids, pseudo_query_weight=args.pseudo_query_weight,
                          val_fraction=0.25, seed=seed)
        E = soup_run.get("epoch")
        if E is None:
            sel = nested.trainer(cfg, index)
            sel.fit()
            E = sel.state.best_epoch
        if E == 0:
            continue
        for key, (order, name) in keys.items():
            r = res.setdefault(key, {"epoch": E})
            if name in soup_run:
                r["constant"] = soup_run[name]
            t0 = time.perf_counter()
            for variant in todo[key]:
                factor, decayed = VARIANTS[variant]
                ref = nested.trainer(dataclasses.replace(cfg, val_fraction=0.0, epochs=max(1, round(factor * E))),
                                     index, trainer_class=decayed_trainer() if decayed else None, order_seed=order)
                ref.fit()
                r[variant] = nested.outer_scores(ref)
            r["secs"] = r.get("secs", 0) + round(time.perf_counter() - t0)
            atomic_write_json(cache, res)
            print(key, r, flush=True)

    lines = [f"# The refit's length and learning-rate schedule, nested hold-out on {ws.dataset.name}'s train split",
             "", f"{len(nested.inner)} inner queries, {len(nested.outer)} outer queries "
             f"({len(nested.outer_unseen)} unseen: no inner query points to their positives); JPQ full at "
             f"{args.ratio}x, centroid rate {args.lr_centroids:g}, pseudo-query weight {args.pseudo_query_weight:g}; "
             "E = the selection run's epoch count. Each cell: outer nDCG@10 all / unseen. The test split is not "
             "read.", "",
             "| run | E | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    lines += outer_score_rows(res, VARIANTS)
    write_cached_report(args.out, lines, __file__, argv, t_all,
                        f"{cache.name}, constant refits from {Path(args.soup_cache).name}")


if __name__ == "__main__":
    main()
