"""Would a smoothed validation curve pick better epoch counts? A nested hold-out on the train split.

    python bench/epoch_smoothing_nested.py [--seeds 0,1] [--ratio 96]     # ~6 min per seed

JPQ full (the demo's 96x choices: centroid rate 1e-3, pseudo-query weight 1) trains on an inner 80%
of SciFact's train split (`holdout_split`, seed 123) and selects its epoch count on a quarter of
it, as the demo does; the selected count is then refit on the whole inner 80% and scored on the
outer 20% (test never read). The selection run goes 20 epochs, so both rules are simulated on the
same curve with the demo's early stopping (patience 3):
  A. the demo's rule: the epoch of the best held-out score;
  B. the best 3-epoch centred mean of the held-out score (a single-epoch spike weighs a third).
Runs are cached in --cache (JSON), so an interrupted bench resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, NestedHoldout, read_cache, write_cached_report  # noqa: E402


def pick(vals: list[float], eligible: list[bool], patience: int = 3) -> int:
    """The epoch the trainer's loop would select on this curve: the best eligible score above
    epoch 0's, stopping `patience` epochs after the last gain (eligible or not)."""
    best, best_e, gain_v, gain_e = vals[0], 0, vals[0], 0
    for e in range(1, len(vals)):
        if e - 1 - gain_e >= patience:
            break
        if vals[e] > gain_v:
            gain_v, gain_e = vals[e], e
        if eligible[e] and vals[e] > best:
            best, best_e = vals[e], e
    return best_e


def smoothed(vals: list[float]) -> list[float]:
    return [float(np.mean(vals[max(0, e - 1): e + 2])) for e in range(len(vals))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--ratio", type=int, default=96)
    ap.add_argument("--cache", default=str(RESULTS / "epoch_smoothing_nested.json"))
    ap.add_argument("--out", default=str(RESULTS / "epoch_smoothing_nested.md"))
    args = ap.parse_args(argv)

    from jpq.pipeline import build_index, m_for_ratio
    from jpq.storage import atomic_write_json
    from jpq.train import TrainConfig

    cache = Path(args.cache)
    res = read_cache(cache)
    nested = NestedHoldout(args.data)
    ws, inner, outer = nested.ws, nested.inner, nested.outer
    t_all = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        key = f"s{seed} {args.ratio}x"
        if key in res:
            continue
        index = build_index(ws.doc_emb, m_for_ratio(ws.d, args.ratio), opq=True, seed=seed)

        def trainer(cfg):
            return nested.trainer(cfg, index)

        cfg = TrainConfig(mode="jpq", lr_centroids=1e-3, pseudo_query_weight=1.0, val_fraction=0.25, seed=seed,
                          patience=20, epochs=20)
        t0 = time.perf_counter()
        sel = trainer(cfg)
        sel.fit()
        vals = [r["val"] for r in sel.state.history]
        eligible = [r.get("eligible", True) for r in sel.state.history]
        r = {"curve": [round(v, 4) for v in vals], "eA": pick(vals, eligible), "eB": pick(smoothed(vals), eligible)}
        for rule in ("A", "B"):
            if rule == "B" and r["eB"] == r["eA"]:
                r["outer_B"] = r["outer_A"]
                continue
            # epoch 0 selected: the initial index and tower, nothing to refit
            ref = trainer(dataclasses.replace(cfg, val_fraction=0.0, epochs=max(1, r[f"e{rule}"]), patience=3))
            if r[f"e{rule}"] > 0:
                ref.fit()
            r[f"outer_{rule}"] = round(ref.evaluate_ids(outer)["ndcg@10"], 4)
        r["secs"] = round(time.perf_counter() - t0)
        res[key] = r
        atomic_write_json(cache, res)
        print(key, r, flush=True)
    lines = [f"# Epoch selection: argmax vs 3-epoch smoothed, nested hold-out on {ws.dataset.name}'s train split",
             "", f"{len(inner)} inner queries (a quarter held out for selection), {len(outer)} outer queries; "
             "JPQ full, centroid rate 1e-3, pseudo-query weight 1; nDCG@10 on the outer queries after "
             "refitting the selected epoch count on all inner queries. The test split is not read.", "",
             "| run | A: argmax epoch | outer nDCG@10 | B: smoothed epoch | outer nDCG@10 | B - A |",
             "|---|---|---|---|---|---|"]
    for key, r in res.items():
        lines.append(f"| {key} | {r['eA']} | {r['outer_A']:.4f} | {r['eB']} | {r['outer_B']:.4f} | "
                     f"{r['outer_B'] - r['outer_A']:+.4f} |")
    lines += ["", "Held-out curves (epoch 0 = the initial index and tower):", ""]
    lines += [f"- {key}: {' '.join(f'{v:.3f}' for v in r['curve'])}" for key, r in res.items()]
    write_cached_report(args.out, lines, __file__, argv, t_all, Path(args.cache).name)


if __name__ == "__main__":
    main()
