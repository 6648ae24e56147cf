"""Interpolating JPQ full's trained weights back toward its start (WiSE-FT): held-out selection runs.

    python bench/weight_interpolation.py                       # SciFact, 96x, seeds 0-2
    python bench/weight_interpolation.py --data /tmp/scifact-unseen \\
        --demo bench/results/demo_scifact_unseen --ratios 64,96

Fine-tuning a zero-shot model and then averaging its weights with the zero-shot ones
(Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022) keeps most of the
fine-tuning gain on the training distribution while losing less on shifted data. JPQ's risky
case is such a shift: held-out queries whose positives no training query points to. Here the
state of JPQ full after each epoch, theta_e (query tower and centroids; codes fixed), is mixed
with the start theta_0 (the zero-shot tower and the post-hoc OPQ centroids):

    theta(alpha) = theta_0 + alpha * (theta_e - theta_0),   alpha in --alphas

for two epochs: the one the demo's selection picked (best held-out nDCG@10 among the epochs the
unseen guard allows) and the best held-out epoch whatever the guard said. Each mixture gets the
same held-out score and the same guard test (unseen-positive held-out queries against epoch 0,
one standard error) as an epoch does. "with mixtures" is the best allowed mixture (the rule a
trainer option would apply), "demo" alpha 1 at the selected epoch.

Each run is the demo's JPQ full selection run (a fifth of the train split held out, no refit):
centroid rate and pseudo-query weight are those the demo at --demo chose per ratio (seed 0's
choice, kept for every seed), else --lr-centroids / --pseudo-query-weight. The test split is
never read. Writes bench/results/weight_interpolation[_NAME].{md,json}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (add_selection_run_args, combine_states, report_path, selection_runs,  # noqa: E402
                     validate_state, write_report)


def mix_states(start: dict, end: dict, alpha: float) -> dict:
    """start + alpha * (end - start) for the float tensors of a JPQTrainer model state (centroids,
    encoder weights); integer buffers and the codes are taken from `end` (they never change)."""
    return combine_states([start, end], lambda pair: pair[0] + alpha * (pair[1] - pair[0]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection_run_args(ap, "weight_interpolation")
    ap.add_argument("--alphas", default="0.25,0.5,0.75")
    args = ap.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    if not all(0.0 < a < 1.0 for a in alphas):
        raise ValueError(f"--alphas: expected values strictly between 0 and 1, got {args.alphas}")

    from jpq.pipeline import load_workspace

    ws = load_workspace(args.data, embeddings=args.embeddings, progress=False)
    name = ws.dataset.name
    out = report_path(args, "weight_interpolation", name)
    t_all = time.perf_counter()
    records = []
    lines = [f"# Weight interpolation toward the start (WiSE-FT) for JPQ full ({name})", "",
             "Held-out selection runs (a fifth of the train split, no refit); each cell: held-out nDCG@10, "
             "unseen-positive held-out change against epoch 0 +- its standard error, * where the guard "
             "blocks it. Test split never read.", "",
             "| ratio | seed | epoch | " + " | ".join(f"alpha {a:g}" for a in alphas + [1.0]) + " |",
             "|---|---|---|" + "---|" * (len(alphas) + 1)]
    for ratio, seed, lr, w, trainer, secs, st in selection_runs(ws, args):
        states = trainer.epoch_states
        hist = st.history
        top = max(range(len(hist)), key=lambda e: hist[e]["val"])
        rec = {"ratio": ratio, "seed": seed, "lr_centroids": lr, "pseudo_query_weight": w,
               "selected_epoch": st.best_epoch, "best_val_epoch": top, "seconds": secs,
               "curve": [h["val"] for h in hist], "mixtures": []}
        for epoch in sorted({st.best_epoch, top}):
            if epoch == 0:
                continue
            cells = []
            for a in alphas + [1.0]:
                mix = {"epoch": epoch, "alpha": a,
                       **validate_state(trainer, mix_states(states[0], states[epoch], a), epoch)}
                rec["mixtures"].append(mix)
                cells.append(f"{mix['val']:.4f}" + ("" if mix["unseen_change"] is None else
                             f" ({mix['unseen_change']:+.3f} +- {mix['unseen_se']:.3f})")
                             + ("" if mix["eligible"] else " *"))
            tag = ("selected" if epoch == st.best_epoch else "") + \
                  ("/" if epoch == st.best_epoch and epoch == top else "") + ("best held-out" if epoch == top else "")
            lines.append(f"| {ratio}x | {seed} | {epoch} ({tag}) | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        allowed = [m for m in rec["mixtures"] if m["eligible"]]
        rec["demo_val"] = float(st.best_score)
        best_mix = max(allowed, key=lambda m: m["val"]) if allowed else None
        rec["mix_val"] = float(st.best_score) if best_mix is None or best_mix["val"] <= st.best_score \
            else best_mix["val"]
        rec["mix_choice"] = None if best_mix is None or best_mix["val"] <= st.best_score else \
            {"epoch": best_mix["epoch"], "alpha": best_mix["alpha"]}
        records.append(rec)
    lines += ["", "Selected held-out nDCG@10: the demo's rule (alpha 1 over allowed epochs) vs the best allowed "
              "mixture (it falls back to the demo's when no mixture beats it):", "",
              "| ratio | seed | demo (epoch) | with mixtures (epoch, alpha) | seconds |", "|---|---|---|---|---|"]
    for r in records:
        c = r["mix_choice"]
        choice = "same" if c is None else f"{c['epoch']}, {c['alpha']:g}"
        lines.append(f"| {r['ratio']}x | {r['seed']} | {r['demo_val']:.4f} ({r['selected_epoch']}) | "
                     f"{r['mix_val']:.4f} ({choice}) | "
                     f"{r['seconds']:.0f} |")
    for ratio in sorted({r["ratio"] for r in records}):
        rs = [r for r in records if r["ratio"] == ratio]
        lines.append(f"\n{ratio}x mean: demo {np.mean([r['demo_val'] for r in rs]):.4f}, "
                     f"with mixtures {np.mean([r['mix_val'] for r in rs]):.4f} "
                     f"(rate {rs[0]['lr_centroids']:g}, pseudo-query weight {rs[0]['pseudo_query_weight']:g})")
    write_report(out, lines, records, __file__, argv, t_all)


if __name__ == "__main__":
    main()
