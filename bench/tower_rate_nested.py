"""The query tower's learning rate: a nested hold-out on the train split.

    python bench/tower_rate_nested.py [--seeds 0,1,2] [--ratio 96] [--rates 1e-5,2e-5,4e-5]   # ~4 min per run
    python bench/tower_rate_nested.py --mode encoder    # the same for uncompressed-trained

`TrainConfig.lr_encoder` (2e-5) has been the same for every mode since the first demo and was never
chosen on held-out queries, while the centroid rate and the pseudo-query weight are. At 96x JPQ
full loses to uncompressed-trained on queries whose positives no training query points to; a tower
that moves less (or more) per step may keep more (or less) of the zero-shot ranking there. Per seed
and per rate, JPQ full with the demo's 96x choices (centroid rate 1e-3, pseudo-query weight 1) or,
with --mode encoder, the uncompressed-trained run trains on the inner 80% of the train split
(`holdout_split`, seed 123) exactly as the demo does on the whole split: a selection run on three
quarters of it chooses the epoch count on the fourth, then two refits on all of the inner queries,
one with the seed's batch order and one with seed + 1000's (batch order alone moves a 96x refit by
about 0.01, bench/results/refit_soup_nested.md). Each is scored on the outer 20%: nDCG@10 on all
outer queries and on the unseen ones (no inner query points to their positives). The test split
is never read. JPQ full at the default rate (2e-5) is reused from --soup-cache (the same runs) when
present. Runs are cached in --cache, so an interrupted bench resumes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (NestedHoldout, add_nested_run_args, add_soup_cache_arg, read_cache,  # noqa: E402
                     read_soup_cache, refit_mean, write_cached_report)

VARIANTS = ("selected", "refit", "refit'")
DEFAULT_RATE = 2e-5  # TrainConfig.lr_encoder


def run_key(seed: int, mode: str, ratio: int, rate: float) -> str:
    return f"s{seed} {mode if mode == 'encoder' else f'{ratio}x'} lr {rate:g}"


def rate_rows(res: dict, rates, seeds, mode: str, ratio: int) -> list[str]:
    """Per rate: each seed's refit mean (all / unseen) and the mean over the seeds that ran every rate."""
    lines = ["| rate | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | epochs |",
             "|---|" + "---|" * (len(seeds) + 2)]
    complete = [s for s in seeds if all(run_key(s, mode, ratio, rate) in res for rate in rates)]
    for rate in rates:
        cells, alls, unseens, epochs = [], [], [], []
        for s in seeds:
            r = res.get(run_key(s, mode, ratio, rate))
            if r is None:
                cells.append("-")
                continue
            cells.append(f"{refit_mean(r, 'all'):.4f} / {refit_mean(r, 'unseen'):.4f}")
            epochs.append(str(r["epoch"]))
            if s in complete:
                alls.append(refit_mean(r, "all"))
                unseens.append(refit_mean(r, "unseen"))
        mean = f"{np.mean(alls):.4f} / {np.mean(unseens):.4f}" if alls else "-"
        lines.append(f"| {rate:g} | " + " | ".join(cells) + f" | {mean} | {', '.join(epochs)} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nested_run_args(ap, "tower_rate_nested")
    ap.add_argument("--rates", default="1e-5,2e-5,4e-5", help="query tower learning rates")
    ap.add_argument("--mode", default="jpq", choices=("jpq", "encoder"),
                    help="jpq: JPQ full at --ratio; encoder: uncompressed-trained (no index)")
    add_soup_cache_arg(ap, "JPQ full at the default rate")
    args = ap.parse_args(argv)

    from jpq.pipeline import build_index, m_for_ratio
    from jpq.storage import atomic_write_json
    from jpq.train import TrainConfig

    cache = Path(args.cache)
    res = read_cache(cache)
    soup = read_soup_cache(args) if args.mode == "jpq" else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    jpq = args.mode == "jpq"
    nested = NestedHoldout(args.data, args.embeddings, pseudo_queries=jpq and args.pseudo_query_weight > 0)
    ws = nested.ws
    t_all = time.perf_counter()
    for seed in seeds:
        index = build_index(ws.doc_emb, m_for_ratio(ws.d, args.ratio), opq=True, seed=seed) if jpq else None
        for rate in rates:
            key = run_key(seed, args.mode, args.ratio, rate)
            reuse = soup.get(f"s{seed} {args.ratio}x")
            if key not in res and rate == DEFAULT_RATE and reuse and all(v in reuse for v in VARIANTS):
                res[key] = {"epoch": reuse["epoch"], "curve": reuse["curve"],
                            **{v: reuse[v] for v in VARIANTS}, "from": Path(args.soup_cache).name}
                atomic_write_json(cache, res)
            if key in res:
                continue
            extra = {"lr_centroids": args.lr_centroids, "pseudo_query_weight": args.pseudo_query_weight} if jpq else {}
            cfg = TrainConfig(mode=args.mode, lr_encoder=rate, val_fraction=0.25, seed=seed, **extra)
            t0 = time.perf_counter()
            r = nested.select_and_refit(cfg, index, seed)
            r["secs"] = round(time.perf_counter() - t0)
            res[key] = r
            atomic_write_json(cache, res)
            print(key, r, flush=True)

    what = f"JPQ full at {args.ratio}x (centroid rate {args.lr_centroids:g}, pseudo-query weight " \
           f"{args.pseudo_query_weight:g})" if jpq else "uncompressed-trained (no index)"
    lines = [f"# The query tower's learning rate, nested hold-out on {ws.dataset.name}'s train split", "",
             f"{what}; {len(nested.inner)} inner queries (a quarter held out for selection), {len(nested.outer)} "
             f"outer queries ({len(nested.outer_unseen)} unseen: no inner query points to their positives). "
             "Each cell: outer nDCG@10 all / unseen, the mean of the two refits (two batch orders). The test "
             "split is not read.", ""]
    lines += rate_rows(res, rates, seeds, args.mode, args.ratio)
    lines += ["", "Every run (selected state, refit, refit'):", "", "| run | epoch | " + " | ".join(VARIANTS) + " |",
              "|---|---|" + "---|" * len(VARIANTS)]
    lines += [f"| {k} | {r['epoch']} | " + " | ".join(f"{r[v]['all']:.4f} / {r[v]['unseen']:.4f}" for v in VARIANTS)
              + " |" for k, r in res.items()]
    reused = cache.name + (f", {Path(args.soup_cache).name}" if soup else "")
    write_cached_report(args.out, lines, __file__, argv, t_all, reused)


if __name__ == "__main__":
    main()
