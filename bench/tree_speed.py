"""Search speed of jpq.TreeIndex vs faiss IVF on the same documents and queries (CPU).

    python bench/tree_speed.py            # SciFact (5,183 documents, 300 test queries), < 1 min

A k-means tree (8 x 8 = 64 leaves, PQ M = 96 x 8 bits, the trained index's centroid_share 0.5;
search speed does not depend on what training learned) against faiss IndexIVFPQ and IndexIVFFlat
with 64 lists, at beam = nprobe = 3 / 6 / 12 (about 5 / 10 / 20% of documents scored). Medians of
interleaved repeats in one process (and the tree's repeats back to back: interleaved with faiss,
faiss' OpenMP pool and numba's / torch's pools contend on a 2-core machine and the tree's time
varies 1.5x between runs); writes bench/results/tree_speed.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, SCIFACT_MINILM, cpu_model, default_threads  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--embeddings", default=str(SCIFACT_MINILM))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "tree_speed.md"))
    args = ap.parse_args(argv)
    import faiss

    import jpq
    from jpq.data import load_beir
    from jpq.encoders import load_precomputed
    from jpq.tree import TreeIndex

    threads = default_threads()
    faiss.omp_set_num_threads(threads)
    ds = load_beir(args.data)
    d, q = load_precomputed(Path(args.embeddings), ds.corpus_ids, ds.query_ids, 384)
    split = "test" if "test" in ds.qrels else "dev"
    qt = np.ascontiguousarray(q[ds.query_index(ds.split_query_ids(split))])
    tree = TreeIndex(d.shape[1], (8, 8), M=96, centroid_share=0.5)
    tree.train(d, seed=0)
    tree.add(d)
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(d.shape[1]), d.shape[1], 64, 96, 8, faiss.METRIC_INNER_PRODUCT)
    ivfflat = faiss.IndexIVFFlat(faiss.IndexFlatIP(d.shape[1]), d.shape[1], 64, faiss.METRIC_INNER_PRODUCT)
    for ix in (ivfpq, ivfflat):
        ix.train(d)
        ix.add(d)

    def faiss_run(ix, p):
        ix.nprobe = p
        return ix.search(qt, 100)

    rows = []
    for knob in (3, 6, 12):
        runs = {"jpq TreeIndex": lambda: tree.search(qt, 100, knob),
                "faiss IndexIVFPQ": lambda: faiss_run(ivfpq, knob),
                "faiss IndexIVFFlat": lambda: faiss_run(ivfflat, knob)}
        times = {name: [] for name in runs}
        for fn in runs.values():
            fn()  # warm-up (numba compile, caches)
        for _ in range(args.repeats):  # interleaved
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        alone = []  # the tree again, back to back: no other library's thread pool in between
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            runs["jpq TreeIndex"]()
            alone.append(time.perf_counter() - t0)
        times["jpq TreeIndex, back to back"] = alone
        frac = tree.fraction_scored(qt, knob)
        base = statistics.median(times["faiss IndexIVFPQ"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(f"| {knob} | {frac:.3f} | {name} | {med * 1e3:.1f} | {med / base:.2f} |")
            print(rows[-1], flush=True)
    text = (f"# Tree search speed vs faiss IVF ({ds.name}: {len(d)} documents, {len(qt)} queries, k = 100)\n\n"
            f"{cpu_model()}, {threads} threads, jpq {jpq.__version__}, faiss {faiss.__version__}; "
            f"medians of {args.repeats} interleaved repeats (the tree's 'back to back' row: {args.repeats} "
            "repeats of it alone; interleaved with faiss the thread pools of faiss and numba / torch "
            "contend). Command: `python bench/tree_speed.py`.\n\n"
            "| beam = nprobe | tree fraction scored | index | ms (all queries) | vs IVFPQ |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
