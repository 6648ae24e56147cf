"""How much loss should the unseen guard tolerate? A nested hold-out on the train split.

    python bench/guard_nested.py [--seeds 0,1,2] [--ratios 32,96]          # ~5 min per run
    python bench/guard_nested.py --data /tmp/scifact-unseen --tag unseen   # bench/unseen_split.py's folder

The guard (`TrainConfig.guard_tolerance`) never selects an epoch whose held-out queries with
unseen positives (no training query points to them) lost, on average, more than `tolerance`
standard errors of their per-query change against epoch 0 (the post-hoc index and the zero-shot
tower). JPQ full trains on an inner 80% of the train split (`holdout_split`, seed 123) and selects
its epoch count on a quarter of it, as the demo does; every tolerance is simulated on the same
20-epoch curve with the demo's early stopping (`jpq.train.stops_early`, patience 3), and each
selected epoch count is refit on the whole inner 80% and scored on the outer 20%: all outer
queries, and the outer queries whose positives no inner query points to ("unseen"), against the
post-hoc start (epoch 0). The test split is never read. Runs are cached in --cache (JSON), so an
interrupted bench resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (RESULTS, SCIFACT, SCIFACT_MINILM, NestedHoldout, command_line, cpu_model,  # noqa: E402
                     read_cache)

TOLERANCES = (1.0, 0.5, 0.0)
# the demo's choices on SciFact (seed 0): centroid rate, pseudo-query weight
CHOICES = {16: (1e-3, 0.0), 32: (1e-3, 0.0), 64: (1e-3, 1.0), 96: (1e-3, 1.0)}


def simulate(history: list[dict], tolerance: float, patience: int = 3) -> int:
    """The epoch the trainer's loop selects on this curve under `tolerance`: the same bookkeeping
    as `Checkpointing._close_epoch`, with `stops_early` and `guard_allows` deciding."""
    from jpq.train import TrainState, guard_allows, stops_early

    state = TrainState(best_score=history[0]["val"], improved_score=history[0]["val"])
    for e in range(1, len(history)):
        state.epoch = e - 1
        if stops_early(state, patience):
            break
        rec = history[e]
        if rec["val"] > state.improved_score:
            state.improved_score, state.improved_epoch = rec["val"], e
        eligible = "unseen_change" not in rec or guard_allows(rec["unseen_change"], rec["unseen_se"], tolerance)
        if eligible and rec["val"] > state.best_score:
            state.best_score, state.best_epoch = rec["val"], e
    return state.best_epoch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--embeddings", default=str(SCIFACT_MINILM))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ratios", default="32,96")
    ap.add_argument("--lr", type=float, help="centroid rate for every ratio (default: CHOICES)")
    ap.add_argument("--weight", type=float, help="pseudo-query weight for every ratio (default: CHOICES)")
    ap.add_argument("--tag", default="scifact", help="names the cache and report: guard_nested_<tag>.{json,md}")
    args = ap.parse_args(argv)

    from jpq.pipeline import build_index, m_for_ratio
    from jpq.storage import atomic_write_json
    from jpq.train import TrainConfig

    cache, out = RESULTS / f"guard_nested_{args.tag}.json", RESULTS / f"guard_nested_{args.tag}.md"
    res = read_cache(cache)
    nested = NestedHoldout(args.data, args.embeddings)
    ws, inner, outer, outer_unseen = nested.ws, nested.inner, nested.outer, nested.outer_unseen
    choices = {r: (args.lr if args.lr is not None else lr, args.weight if args.weight is not None else w)
               for r, (lr, w) in CHOICES.items()}
    t_all = time.perf_counter()
    for ratio in [int(r) for r in args.ratios.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            key = f"s{seed} {ratio}x"
            if key in res:
                continue
            index = build_index(ws.doc_emb, m_for_ratio(ws.d, ratio), opq=True, seed=seed)

            def trainer(cfg):
                return nested.trainer(cfg, index)

            lr, weight = choices[ratio]
            cfg = TrainConfig(mode="jpq", lr_centroids=lr, pseudo_query_weight=weight, val_fraction=0.25,
                              seed=seed, patience=20, epochs=20)
            t0 = time.perf_counter()
            sel = trainer(cfg)
            sel.fit()
            hist = [{k: r[k] for k in ("val", "unseen_change", "unseen_se") if k in r} for r in sel.state.history]
            r = {"history": hist, "epochs": {}, "outer": {}}
            for tol in TOLERANCES:
                r["epochs"][str(tol)] = simulate(hist, tol)
            for e in sorted(set(r["epochs"].values()) | {0}):
                ref = trainer(dataclasses.replace(cfg, val_fraction=0.0, epochs=max(1, e), patience=3))
                if e > 0:  # epoch 0: the post-hoc index and the zero-shot tower, nothing to refit
                    ref.fit()
                r["outer"][str(e)] = [round(ref.evaluate_ids(outer)["ndcg@10"], 4),
                                      round(ref.evaluate_ids(outer_unseen)["ndcg@10"], 4)]
            r["secs"] = round(time.perf_counter() - t0)
            res[key] = r
            atomic_write_json(cache, res)
            print(key, r["epochs"], r["outer"], r["secs"], "s", flush=True)

    head = " | ".join(f"tol {t:g}: epoch, outer, unseen" for t in TOLERANCES)
    lines = [f"# Unseen-guard tolerance, nested hold-out on {ws.dataset.name}'s train split", "",
             f"{len(inner)} inner queries (a quarter held out for selection), {len(outer)} outer queries, "
             f"{len(outer_unseen)} of them with positives no inner query points to (\"unseen\"). JPQ full "
             "(centroid rate, pseudo-query weight: " + ", ".join(f"{k}x {v[0]:g}, {v[1]:g}" for k, v in choices.items())
             + "); nDCG@10 on the outer queries after refitting the selected epoch count on all inner "
             "queries; epoch 0 is the post-hoc OPQ index with the zero-shot tower. The test split is not read.", "",
             f"| run | post-hoc: outer, unseen | {head} |", "|---|---|" + "---|" * len(TOLERANCES)]
    for key, r in res.items():
        cells = [f"{r['outer']['0'][0]:.4f}, {r['outer']['0'][1]:.4f}"]
        for t in TOLERANCES:
            e = r["epochs"][str(t)]
            o, u = r["outer"][str(e)]
            cells.append(f"{e}, {o:.4f}, {u:.4f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Held-out curves: val nDCG@10 (unseen change / its standard error), epochs 0-20:", ""]
    for key, r in res.items():
        lines.append(f"- {key}: " + " ".join(
            f"{h['val']:.3f}" + (f" ({h['unseen_change']:+.3f}/{h['unseen_se']:.3f})" if "unseen_change" in h else "")
            for h in r["history"]))
    lines += ["", f"Command: `{command_line(__file__, argv)}` ({time.perf_counter() - t_all:.0f} s this invocation "
              f"on {cpu_model()}; runs reused from {cache.name} when present)."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
