"""Averaging the weights of JPQ runs (a "model soup"): a nested hold-out on the train split.

    python bench/refit_soup_nested.py [--seeds 0,1,2] [--ratio 96]     # ~8 min per seed

Runs fine-tuned from one start (same zero-shot tower, same OPQ centroids, same fixed codes) with
different data can be averaged weight by weight (Wortsman et al., "Model soups", ICML 2022), which
often scores above each of them. The demo already trains two such runs per row at no extra cost:
the selection run (80% of the training queries, epoch count chosen on the other 20%) and the refit
(all of them, that many epochs). Here, per seed:

  selected   the selection run's selected state (what `--no-refit` keeps);
  refit      the refit on all queries (what the demo keeps);
  refit'     a second refit that differs only in its batch order and random draws;
  soup(s,r)  the mean of selected and refit (free: both exist in every demo run);
  soup(r,r') the mean of the two refits (one more refit's time);
  soup(all)  the mean of all three.

JPQ full with the demo's 96x choices (centroid rate 1e-3, pseudo-query weight 1) trains on an
inner 80% of the train split (`holdout_split`, seed 123) exactly as the demo does on the whole
split; every state is scored on the outer 20%: nDCG@10 on all outer queries and on those whose
positives no inner query points to ("unseen", where compression costs most). The test split is
never read. Runs are cached in --cache (JSON), so an interrupted bench resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (NestedHoldout, add_nested_run_args, combine_states, outer_score_rows,  # noqa: E402
                     read_cache, write_cached_report)

VARIANTS = ("selected", "refit", "refit'", "soup(s,r)", "soup(r,r')", "soup(all)")


def average_states(states: list[dict]) -> dict:
    """The weight-by-weight mean of JPQTrainer model states from one start (`combine_states`)."""
    return combine_states(states, lambda values: torch.stack(values).mean(0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nested_run_args(ap, "refit_soup_nested")
    args = ap.parse_args(argv)

    from jpq.pipeline import build_index, m_for_ratio
    from jpq.storage import atomic_write_json
    from jpq.train import TrainConfig

    cache = Path(args.cache)
    res = read_cache(cache)
    nested = NestedHoldout(args.data, args.embeddings, pseudo_queries=args.pseudo_query_weight > 0)
    ws = nested.ws
    t_all = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        key = f"s{seed} {args.ratio}x"
        if key in res:
            continue
        index = build_index(ws.doc_emb, m_for_ratio(ws.d, args.ratio), opq=True, seed=seed)

        cfg = TrainConfig(mode="jpq", lr_centroids=args.lr_centroids, pseudo_query_weight=args.pseudo_query_weight,
                          val_fraction=0.25, seed=seed)
        t0 = time.perf_counter()
        sel = nested.trainer(cfg, index)
        sel.fit()  # loads the selected state
        best = sel.state.best_epoch
        r = {"epoch": best, "curve": [round(h["val"], 4) for h in sel.state.history]}
        states = {"selected": sel._model_state()}
        if best == 0:
            r["note"] = "epoch 0 selected: nothing to refit"
        else:
            for name, order in (("refit", None), ("refit'", seed + 1000)):
                ref = nested.trainer(dataclasses.replace(cfg, val_fraction=0.0, epochs=best), index, order_seed=order)
                ref.fit()
                states[name] = ref._model_state()
            states["soup(s,r)"] = average_states([states["selected"], states["refit"]])
            states["soup(r,r')"] = average_states([states["refit"], states["refit'"]])
            states["soup(all)"] = average_states([states["selected"], states["refit"], states["refit'"]])
        for name, st in states.items():
            sel._load_model_state(st)
            r[name] = nested.outer_scores(sel)
        r["secs"] = round(time.perf_counter() - t0)
        res[key] = r
        atomic_write_json(cache, res)
        print(key, r, flush=True)

    lines = [f"# Weight averaging of JPQ runs (model soups), nested hold-out on {ws.dataset.name}'s train split",
             "", f"{len(nested.inner)} inner queries (a quarter held out for selection), {len(nested.outer)} outer "
             f"queries ({len(nested.outer_unseen)} unseen: no inner query points to their positives); JPQ full, "
             f"centroid rate {args.lr_centroids:g}, pseudo-query weight {args.pseudo_query_weight:g}. Each cell: "
             "outer nDCG@10 all / unseen. The test split is not read.", "",
             "| run | epochs | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    lines += outer_score_rows(res, VARIANTS)
    write_cached_report(args.out, lines, __file__, argv, t_all, cache.name)


if __name__ == "__main__":
    main()
