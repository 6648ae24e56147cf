"""One TrainConfig field, several values: a nested hold-out on the train split.

    python bench/field_nested.py --field corpus_recon_weight --values 1,10 [--seeds 0,1,2] [--ratio 96]
    python bench/field_nested.py --field lr_encoder --values 1e-5,2e-5 --mode encoder   # uncompressed-trained

Per seed and per value, JPQ full with the demo's 96x choices (centroid rate 1e-3, pseudo-query
weight 1) or, with --mode encoder, the uncompressed-trained run trains on the inner 80% of the
train split (`holdout_split`, seed 123) exactly as the demo does on the whole split: a selection
run on three quarters of it chooses the epoch count on the fourth, then two refits on all of the
inner queries, one with the seed's batch order and one with seed + 1000's (batch order alone moves
a 96x refit by about 0.01, bench/results/refit_soup_nested.md). Each is scored on the outer 20%:
nDCG@10 on all outer queries and on the unseen ones (no inner query points to their positives).
The test split is never read. JPQ full at the field's default value is reused from --soup-cache
(the same runs) when present, and on the default data for other seeds from the "one index" runs
of bench/results/opq_restarts_nested.json (the same runs again). Runs are cached in --cache, so an interrupted bench resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (NestedHoldout, add_nested_run_args, add_soup_cache_arg, read_cache,  # noqa: E402
                     read_default_runs, refit_mean, write_cached_report)

VARIANTS = ("selected", "refit", "refit'")
KEY_LABELS = {"lr_encoder": "lr"}  # the run keys of bench/tower_rate_nested.py, which this generalises


def run_key(seed: int, mode: str, ratio: int, field: str, value: float) -> str:
    return f"s{seed} {mode if mode == 'encoder' else f'{ratio}x'} {KEY_LABELS.get(field, field)} {value:g}"


def value_rows(res: dict, field: str, values, seeds, mode: str, ratio: int) -> list[str]:
    """Per value: each seed's refit mean (all / unseen) and the mean over the seeds that ran every value."""
    lines = [f"| {field} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | epochs |",
             "|---|" + "---|" * (len(seeds) + 2)]
    complete = [s for s in seeds if all(run_key(s, mode, ratio, field, v) in res for v in values)]
    for value in values:
        cells, alls, unseens, epochs = [], [], [], []
        for s in seeds:
            r = res.get(run_key(s, mode, ratio, field, value))
            if r is None:
                cells.append("-")
                continue
            cells.append(f"{refit_mean(r, 'all'):.4f} / {refit_mean(r, 'unseen'):.4f}")
            epochs.append(str(r["epoch"]))
            if s in complete:
                alls.append(refit_mean(r, "all"))
                unseens.append(refit_mean(r, "unseen"))
        mean = f"{np.mean(alls):.4f} / {np.mean(unseens):.4f}" if alls else "-"
        lines.append(f"| {value:g} | " + " | ".join(cells) + f" | {mean} | {', '.join(epochs)} |")
    return lines


def main(argv=None, stem: str = "field_nested", field: str | None = None, title: str | None = None,
         script: str = __file__, shown_argv: list[str] | None = None):
    """`stem` names the default --cache / --out; a wrapper passes `field` (then no --field), `title`,
    and itself as `script` with its own arguments as `shown_argv` (the report's command line)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nested_run_args(ap, stem)
    if field is None:
        ap.add_argument("--field", required=True, help="a numeric TrainConfig field")
    ap.add_argument("--values", required=True, help="comma-separated values of the field")
    ap.add_argument("--mode", default="jpq", choices=("jpq", "encoder"),
                    help="jpq: JPQ full at --ratio; encoder: uncompressed-trained (no index)")
    add_soup_cache_arg(ap, "JPQ full at the field's default value")
    args = ap.parse_args(argv)

    from jpq.pipeline import build_index, m_for_ratio
    from jpq.storage import atomic_write_json
    from jpq.train import TrainConfig

    field = field or args.field
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    if field not in defaults or isinstance(defaults[field], bool) or not isinstance(defaults[field], (int, float)):
        ap.error(f"--field must be a numeric TrainConfig field, got {field!r}")
    cast = type(defaults[field])
    cache = Path(args.cache)
    res = read_cache(cache)
    default_runs = read_default_runs(args) if args.mode == "jpq" else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    values = [cast(float(v)) for v in args.values.split(",")]
    jpq = args.mode == "jpq"
    nested = NestedHoldout(args.data, args.embeddings, pseudo_queries=jpq and args.pseudo_query_weight > 0)
    ws = nested.ws
    t_all = time.perf_counter()
    for seed in seeds:
        index = build_index(ws.doc_emb, m_for_ratio(ws.d, args.ratio), opq=True, seed=seed) if jpq else None
        for value in values:
            key = run_key(seed, args.mode, args.ratio, field, value)
            reuse = default_runs.get(f"s{seed} {args.ratio}x")
            if key not in res and value == defaults[field] and reuse and all(v in reuse for v in VARIANTS):
                res[key] = {"epoch": reuse["epoch"], **({"curve": reuse["curve"]} if "curve" in reuse else {}),
                            **{v: reuse[v] for v in VARIANTS}, "from": reuse["from"]}
                atomic_write_json(cache, res)
            if key in res:
                continue
            extra = {"lr_centroids": args.lr_centroids, "pseudo_query_weight": args.pseudo_query_weight} if jpq else {}
            cfg = TrainConfig(mode=args.mode, val_fraction=0.25, seed=seed, **{**extra, field: value})
            t0 = time.perf_counter()
            r = nested.select_and_refit(cfg, index, seed)
            r["secs"] = round(time.perf_counter() - t0)
            res[key] = r
            atomic_write_json(cache, res)
            print(key, r, flush=True)

    what = f"JPQ full at {args.ratio}x (centroid rate {args.lr_centroids:g}, pseudo-query weight " \
           f"{args.pseudo_query_weight:g})" if jpq else "uncompressed-trained (no index)"
    lines = [f"# {title or f'TrainConfig.{field}'}, nested hold-out on {ws.dataset.name}'s train split", "",
             f"{what}; {len(nested.inner)} inner queries (a quarter held out for selection), {len(nested.outer)} "
             f"outer queries ({len(nested.outer_unseen)} unseen: no inner query points to their positives). "
             "Each cell: outer nDCG@10 all / unseen, the mean of the two refits (two batch orders). The test "
             f"split is not read. Default {field}: {defaults[field]:g}.", ""]
    lines += value_rows(res, field, values, seeds, args.mode, args.ratio)
    lines += ["", "Every run (selected state, refit, refit'):", "", "| run | epoch | " + " | ".join(VARIANTS) + " |",
              "|---|---|" + "---|" * len(VARIANTS)]
    lines += [f"| {k} | {r['epoch']} | " + " | ".join(f"{r[v]['all']:.4f} / {r[v]['unseen']:.4f}" for v in VARIANTS)
              + " |" for k, r in res.items()]
    reused = ", ".join([cache.name, *sorted({r["from"] for r in default_runs.values()})])
    write_cached_report(args.out, lines, script, argv if shown_argv is None else shown_argv, t_all, reused)


if __name__ == "__main__":
    main()
