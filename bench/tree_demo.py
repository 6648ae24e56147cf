"""Learned tree index vs faiss IVF on SciFact, at 5% / 10% / 20% of documents scored.

    python bench/tree_demo.py                       # SciFact + precomputed MiniLM embeddings
    python bench/tree_demo.py --data DIR --embeddings FILE.npz --stem tree_NAME

A thin script: the demo itself is `jpq.tree.run_tree_demo` (what `jpq demo --index tree` runs).
Trains on the train split (model selection on held-out train queries), reports on test, and
writes bench/results/{stem}.{md,json,png}. Checkpoints go to a temporary folder unless
--checkpoints is given.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, SCIFACT_MINILM, command_line, cpu_model, default_threads  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--embeddings", default=str(SCIFACT_MINILM))
    ap.add_argument("--stem", default="tree_scifact")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--checkpoints", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    import faiss
    import jpq
    from jpq.data import load_beir
    from jpq.encoders import load_precomputed
    from jpq.tree import run_tree_demo

    dataset = load_beir(args.data, progress=not args.quiet)
    dim = int(np.load(args.embeddings)["corpus"].shape[1])
    doc_emb, query_emb = load_precomputed(Path(args.embeddings), dataset.corpus_ids, dataset.query_ids, dim)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        records = run_tree_demo(dataset, doc_emb, query_emb, args.out, seed=args.seed, progress=not args.quiet,
                                stem=args.stem, checkpoint_dir=args.checkpoints or tmp)
    seconds = time.perf_counter() - t0
    md = Path(args.out) / f"{args.stem}.md"
    cmd = command_line(__file__, argv)
    md.write_text(md.read_text() + f"\nCommand: `{cmd}` ({seconds:.0f} s in all on {cpu_model()}, "
                  f"{default_threads()} threads; jpq {jpq.__version__}, faiss {faiss.__version__}).\n")
    for r in records:
        print(f"{r['fraction_target']:.0%} {r['method']:15s} fraction {r['fraction_scored']:.4f} "
              f"R@100 {r['recall@100']:.4f} nDCG@10 {r['ndcg@10']:.4f}")
    print(f"wrote {md} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
