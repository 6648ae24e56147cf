"""JPQ full started from centroids pre-trained on the corpus's pseudo-queries: a nested hold-out.

    python bench/pseudo_init_nested.py [--seeds 0,1,2] [--ratio 96] [--init-epochs 6]   # ~5 min per seed

`bench/pseudo_query_posthoc.py` found that the corpus alone (each document's title pseudo-query,
cross-entropy over the corpus, centroids only, no reconstruction term) lifts post-hoc OPQ's
zero-shot nDCG@10 at 96x from 0.543 / 0.562 to 0.579 / 0.586 (seeds 0 / 1). Here that label-free
pre-training (`train_centroids`, 6 epochs) is JPQ full's start instead of OPQ itself, with the
demo's 96x choices otherwise; each seed's run trains and selects on the inner 80% of the train
split and is scored on the outer 20% (all / unseen-positive outer queries), as in
bench/field_nested.py; the unseen guard compares with post-hoc OPQ (as for the trainer's own
initialisations), not with the pre-trained start. The test split is never read. Runs from OPQ itself (the demo's start) are
reused from --soup-cache (on the default data bench/results/refit_soup_nested.json, then
opq_restarts_nested.json's "one index" runs: `machine.read_default_runs`).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (NestedHoldout, add_nested_run_args, add_soup_cache_arg, read_cache,  # noqa: E402
                     read_default_runs, refit_mean, write_cached_report)
from pseudo_query_posthoc import train_centroids  # noqa: E402

VARIANTS = ("selected", "refit", "refit'")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nested_run_args(ap, "pseudo_init_nested")
    ap.add_argument("--init-epochs", type=int, default=6)
    add_soup_cache_arg(ap, "JPQ full from OPQ itself")
    args = ap.parse_args(argv)

    from jpq.pipeline import build_index, m_for_ratio
    from jpq.storage import atomic_write_json
    from jpq.train import JPQTrainer, TrainConfig

    cache = Path(args.cache)
    res = read_cache(cache)
    default_runs = read_default_runs(args)
    nested = NestedHoldout(args.data, args.embeddings)
    ws = nested.ws
    t_all = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        key = f"s{seed} {args.ratio}x"
        if key not in res:
            index = build_index(ws.doc_emb, m_for_ratio(ws.d, args.ratio), opq=True, seed=seed)
            snapshots = train_centroids(index, ws.doc_emb, nested.pseudo, "ce", 0.0, args.init_epochs, seed,
                                        lambda trained: trained.centroids.copy())
            init = copy.copy(index)  # OPQ's rotation and codes, the pre-trained centroids
            init.centroids = snapshots[args.init_epochs]

            class GuardedAgainstOPQ(JPQTrainer):
                """The unseen guard compares with post-hoc OPQ, as for the trainer's own initialisations
                (`_initial_record`), not with the pre-trained start."""

                def __init__(self, *a, **kw):
                    super().__init__(*a, **kw)
                    self._given_index = index
            cfg = TrainConfig(mode="jpq", val_fraction=0.25, seed=seed, lr_centroids=args.lr_centroids,
                              pseudo_query_weight=args.pseudo_query_weight)
            t0 = time.perf_counter()
            r = nested.select_and_refit(cfg, init, seed, GuardedAgainstOPQ)
            r["secs"] = round(time.perf_counter() - t0)
            res[key] = r
            atomic_write_json(cache, res)
            print(key, r, flush=True)

    lines = [f"# JPQ full from pseudo-query pre-trained centroids, nested hold-out on {ws.dataset.name}'s train split",
             "", f"JPQ full at {args.ratio}x (centroid rate {args.lr_centroids:g}, pseudo-query weight "
             f"{args.pseudo_query_weight:g}); start: OPQ (the demo) or OPQ's centroids after {args.init_epochs} epochs "
             f"of the title pseudo-queries' cross-entropy (bench/pseudo_query_posthoc.py). {len(nested.inner)} inner "
             f"queries, {len(nested.outer)} outer ({len(nested.outer_unseen)} unseen). Cells: outer nDCG@10 all / "
             "unseen, mean of the two refits. Test split not read.", "",
             "| start | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---|" * (len(seeds) + 1)]
    for name, runs in (("OPQ", default_runs), ("pre-trained", res)):
        have = [runs.get(f"s{s} {args.ratio}x") for s in seeds]
        cells = [f"{refit_mean(r, 'all'):.4f} / {refit_mean(r, 'unseen'):.4f} ({r['epoch']})" if r else "-" for r in have]
        done = [r for r in have if r]
        mean = (f"{np.mean([refit_mean(r, 'all') for r in done]):.4f} / "
                f"{np.mean([refit_mean(r, 'unseen') for r in done]):.4f}") if done else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    write_cached_report(args.out, lines, __file__, argv, t_all,
                        ", ".join([cache.name, *sorted({r["from"] for r in default_runs.values()})]))


if __name__ == "__main__":
    main()
