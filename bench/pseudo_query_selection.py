"""Should held-out selection choose the pseudo-query weight, as it chooses the centroid rate?

    python bench/pseudo_query_selection.py                 # centroids-only grid, 3 splits, ~25 min
    python bench/pseudo_query_selection.py --jpq           # + JPQ full with and without the term

The demo picks the centroid learning rate per ratio by the held-out score of cheap centroids-only
runs (`jpq.demo.DEFAULT_CENTROID_LRS`) and hands it to JPQ full. The pseudo-query term
(`TrainConfig.pseudo_query_weight`) also acts on the centroids only, so the same runs can choose
it. This bench measures whether that choice is sound, on the train split alone (the test split is
never read): for each split seed (the trainer's own held-out fifth of the train split, the OPQ seed)
and ratio,

1. centroids-only runs over the grid centroid rate x pseudo-query weight: held-out nDCG@10 at the
   selected epoch (no refit), and the (rate, weight) the demo's rule takes: the best held-out score,
   ties to the gentler rate and the smaller weight;
2. with --jpq, JPQ full (query tower + centroids) as the demo trains it before and after the
   weight joins the grid: at the rate chosen among weight-0 runs with weight 0, and at the grid's
   (rate, weight), in the cells where the two differ (elsewhere the rule changes nothing;
   --jpq-all runs them too): does the choice made by centroids-only runs also give JPQ full the
   better held-out score?

Every run is stored in --cache (JSON, one entry per run) so an interrupted bench resumes and a
second invocation with --jpq reuses part 1. Writes bench/results/pseudo_query_selection.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, command_line, cpu_model  # noqa: E402


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ratios", default="16,32,64,96")
    ap.add_argument("--lrs", default="1e-4,1e-3", help="centroid rates of the centroids-only grid")
    ap.add_argument("--weights", default="0,1", help="pseudo-query weights of the grid")
    ap.add_argument("--jpq", action="store_true",
                    help="also JPQ full with each weight, where the grid chose a weight other than the first")
    ap.add_argument("--jpq-all", action="store_true", help="with --jpq: in every cell, not only those")
    ap.add_argument("--cache", default=str(RESULTS / "pseudo_query_selection.json"))
    ap.add_argument("--out", default=str(RESULTS / "pseudo_query_selection.md"))
    args = ap.parse_args(argv)

    from jpq.pipeline import build_index, load_workspace, m_for_ratio, train_run
    from jpq.storage import atomic_write_json
    from jpq.train import TrainConfig

    seeds = [int(s) for s in args.seeds.split(",")]
    ratios = [int(r) for r in args.ratios.split(",")]
    lrs, weights = floats(args.lrs), floats(args.weights)
    cache_path = Path(args.cache)
    runs = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    ws = load_workspace(args.data, progress=False)
    t_all = time.perf_counter()
    indexes = {}

    def run(mode, seed, ratio, lr, w):
        key = f"{mode} seed{seed} {ratio}x lr{lr:g} w{w:g}"
        if key not in runs:
            if (seed, ratio) not in indexes:
                indexes[(seed, ratio)] = build_index(ws.doc_emb, m_for_ratio(ws.d, ratio), opq=True, seed=seed)
            cfg = TrainConfig(mode=mode, lr_centroids=lr, pseudo_query_weight=w, refit=False, seed=seed)
            tr, secs, _ = train_run(ws, cfg, indexes[(seed, ratio)], None, progress=False, select_only=True)
            runs[key] = {"val": tr.state.best_score, "epoch": tr.state.best_epoch,
                         "epoch0": tr.state.history[0]["val"], "seconds": secs}
            atomic_write_json(cache_path, runs)
            print(f"{key}: held-out {runs[key]['val']:.4f} (epoch {runs[key]['epoch']}, "
                  f"{runs[key]['seconds']:.0f} s)", flush=True)
        return runs[key]

    def pick(cands):
        """The demo's rule: best held-out score; ties to the smaller weight, then the gentler rate."""
        return max(cands, key=lambda c: (c[0], -c[2], -c[1]))

    lines = [f"# Choosing the pseudo-query weight by held-out centroids-only runs ({ws.dataset.name})", "",
             "Held-out nDCG@10 (the trainer's own held-out fifth of the train split; split and OPQ seed per "
             "row; no refit; the test split is never read). `c` = centroids-only, `lr` its centroid rate, "
             "`w` the pseudo-query weight.", ""]
    head = [f"c lr{lr:g} w{w:g}" for w in weights for lr in lrs]
    lines += ["## 1. Centroids-only grid", "",
              "| seed | ratio | " + " | ".join(head) + " | chosen (lr, w) | rate chosen at w=0 |",
              "|" + "---|" * (len(head) + 4)]
    chosen = {}
    for seed in seeds:
        for ratio in ratios:
            cands = [(run("centroids", seed, ratio, lr, w)["val"], lr, w) for w in weights for lr in lrs]
            best = pick(cands)
            base = pick([c for c in cands if c[2] == weights[0]])
            chosen[(seed, ratio)] = (best, base)
            lines.append(f"| {seed} | {ratio}x | " + " | ".join(f"{c[0]:.4f}" for c in cands)
                         + f" | ({best[1]:g}, {best[2]:g}) | {base[1]:g} |")
    if args.jpq:
        lines += ["", "## 2. JPQ full: the grid's (rate, weight) against the rate chosen at weight 0", "",
                  "| seed | ratio | before: (lr, w) | held-out | with the weight chosen: (lr, w) | held-out | change |",
                  "|---|---|---|---|---|---|---|"]
        gains = []
        for seed in seeds:
            for ratio in ratios:
                best, base = chosen[(seed, ratio)]
                before = (base[1], weights[0])
                after = (best[1], best[2])
                if before == after and not args.jpq_all:
                    lines.append(f"| {seed} | {ratio}x | ({before[0]:g}, {before[1]:g}) | | same | | +0 (same run) |")
                    gains.append(0.0)
                    continue
                s0 = run("jpq", seed, ratio, *before)["val"]
                s1 = run("jpq", seed, ratio, *after)["val"]
                gains.append(s1 - s0)
                lines.append(f"| {seed} | {ratio}x | ({before[0]:g}, {before[1]:g}) | {s0:.4f} | "
                             f"({after[0]:g}, {after[1]:g}) | {s1:.4f} | {s1 - s0:+.4f} |")
        lines += ["", f"Mean held-out change of JPQ full when the weight is chosen too: "
                  f"{sum(gains) / len(gains):+.4f} over {len(gains)} cells "
                  f"({sum(g > 0 for g in gains)} up, {sum(g < 0 for g in gains)} down)."]
    cmd = command_line(__file__, argv)
    lines += ["", f"Command: `{cmd}` ({time.perf_counter() - t_all:.0f} s this invocation, on {cpu_model()}; "
              f"runs reused from {cache_path.name} when present)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
