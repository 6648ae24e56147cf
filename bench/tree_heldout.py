"""The tree demo on held-out *training* queries: is the test-split result typical?

    python bench/tree_heldout.py                    # SciFact, 6 outer seeds, 3-5 min
    python bench/tree_heldout.py --seeds 123,7      # fewer seeds

SciFact's test split has 300 queries, so a Recall@100 difference of 0.01-0.02 between two indexes
is inside its paired bootstrap interval (bench/results/tree_scifact.md). This script asks the same
question on other queries without touching the test split: for each outer seed it holds out a
random fifth of the train split's queries, runs exactly the tree demo (`jpq.tree.run_tree_demo`,
default TreeConfig: its own inner hold-out for selection, then the refit) on the other
four-fifths, and evaluates the tree, its k-means init, faiss IVF-Flat and IVF-PQ on the held-out
fifth at 5% / 10% / 20% of documents scored. Writes bench/results/tree_heldout.md (per seed,
mean over seeds, and the tree's wins per seed); --keep DIR keeps each seed's demo outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, SCIFACT_MINILM, command_line, cpu_model, default_threads  # noqa: E402

METHODS = ("tree", "tree-init", "ivf-flat", "ivf-pq")


def outer_split(dataset, seed: int, fraction: float = 0.2):
    """A copy of `dataset` whose qrels are {"train": four-fifths of the train split's queries,
    "heldout": the other fifth} (random, as jpq.train.holdout_split)."""
    from jpq.train import holdout_split

    train = dataset.qrels["train"]
    ids = [q for q in dataset.split_query_ids("train") if any(r > 0 for r in train[q].values())]
    kept, held = holdout_split(ids, {}, fraction, seed)
    qrels = {"train": {q: train[q] for q in kept}, "heldout": {q: train[q] for q in held}}
    return dataclasses.replace(dataset, qrels=qrels, name=f"{dataset.name} (outer seed {seed})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--embeddings", default=str(SCIFACT_MINILM))
    ap.add_argument("--seeds", default="123,7,11,3,5,19")
    ap.add_argument("--out", default=str(RESULTS / "tree_heldout.md"))
    ap.add_argument("--keep", default=None, help="folder for each seed's demo outputs (default: temporary)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from jpq.data import load_beir
    from jpq.encoders import load_precomputed
    from jpq.tree import run_tree_demo

    dataset = load_beir(args.data, progress=False)
    dim = int(np.load(args.embeddings)["corpus"].shape[1])
    doc_emb, query_emb = load_precomputed(Path(args.embeddings), dataset.corpus_ids, dataset.query_ids, dim)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    runs = {}
    for seed in seeds:
        view = outer_split(dataset, seed)
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = Path(args.keep or tmp) / f"seed{seed}"
            records = run_tree_demo(view, doc_emb, query_emb, out_dir, progress=False,
                                    test_split="heldout", checkpoint_dir=Path(tmp) / "checkpoints")
            details = json.loads((out_dir / "results-details.json").read_text())["settings"]
        runs[seed] = {"records": {(r["method"], r["fraction_target"]): r for r in records}, "settings": details}
        at20 = runs[seed]["records"]
        print(f"seed {seed}: Recall@100 at 20% tree {at20[('tree', 0.2)]['recall@100']:.3f} "
              f"ivf-pq {at20[('ivf-pq', 0.2)]['recall@100']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    fractions = sorted({f for _, f in next(iter(runs.values()))["records"]})
    s0 = next(iter(runs.values()))["settings"]
    lines = [f"# Learned tree vs IVF on held-out training queries ({dataset.name})", "",
             f"For each outer seed, a random fifth of the train split's queries is held out; the tree demo "
             f"(`jpq.tree.run_tree_demo`, default settings: inner hold-out for selection, then refit) runs on the "
             f"other four-fifths and is evaluated on the held-out fifth ({s0['test_queries']} queries), "
             f"{s0['leaves']} leaves, PQ M={s0['M']}. The test split is never read.", "",
             "Recall@100 (nDCG@10) at each target fraction of documents scored:", "",
             "| seed | method | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
             "|---|---|" + "---|" * len(fractions)]
    for seed, run in runs.items():
        for m in METHODS:
            cells = [f"{run['records'][(m, f)]['recall@100']:.3f} ({run['records'][(m, f)]['ndcg@10']:.3f})"
                     for f in fractions]
            lines.append(f"| {seed} | {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean over the {len(seeds)} seeds, and the seeds on which the tree is higher:", "",
              "| method | " + " | ".join(f"R@100 {f:.0%}" for f in fractions) + " | "
              + " | ".join(f"nDCG@10 {f:.0%}" for f in fractions) + " |",
              "|---|" + "---|" * (2 * len(fractions))]
    for m in METHODS:
        cells = []
        for metric in ("recall@100", "ndcg@10"):
            for f in fractions:
                vals = [run["records"][(m, f)][metric] for run in runs.values()]
                cell = f"{np.mean(vals):.3f}"
                if m != "tree":
                    wins = sum(run["records"][("tree", f)][metric] > run["records"][(m, f)][metric]
                               for run in runs.values())
                    cell += f" (tree higher {wins}/{len(runs)})"
                cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Held-out queries none of whose positives is a positive of the outer training queries "
              "(mean over seeds):", "",
              "| method | " + " | ".join(f"R@100 {f:.0%}" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for m in METHODS:
        cells = []
        for f in fractions:
            vals = [r["recall@100"] for run in runs.values() for r in run["settings"]["unseen_positive_queries"]
                    if r["method"] == m and r["fraction_target"] == f]
            cells.append(f"{np.mean(vals):.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n_unseen = [run["settings"]["unseen_positive_queries"][0]["queries"] for run in runs.values()]
    cmd = command_line(__file__, argv)
    lines += ["", f"({min(n_unseen)}-{max(n_unseen)} such queries per seed.)", "",
              f"Command: `{cmd}` ({seconds:.0f} s on {cpu_model()}, {default_threads()} threads)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
