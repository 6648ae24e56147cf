"""NumPy's BLAS threads vs the numba scans that follow them: OPQ and tree search on SciFact.

    python bench/blas_contention.py          # ~2 min

Above its small-matrix size NumPy's bundled OpenBLAS runs a product on its own threads, which
keep spinning for a while after the call; a numba kernel started then (the ADC scan of a search)
shares the cores with them. `jpq.index.matmul_t` computes such products with torch instead
(whose OpenMP pool numba's kernels use too) and keeps NumPy for small ones. Timed here, in one
process, with `matmul_t` as shipped vs NumPy's `x @ w.T` patched in its place:

- `PQIndex.search` of an OPQ index (M = 48, k = 100) at 1-300 queries (the rotation of the
  queries is the product), next to the plain PQ index of the same M (no rotation at all);
- `TreeIndex.search` (8 x 8 leaves, M = 96, centroid share 0.5, k = 100) of the 300 test
  queries at beam 3 / 6 / 12 (the leaf-centroid scores are the product).

Blocks of back-to-back repeats per variant (`in_blocks`). Also checks that both give the same
search results. Writes bench/results/blas_contention.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, SCIFACT_MINILM, command_line, cpu_model, default_threads  # noqa: E402


def numpy_matmul_t(x, w):
    return np.ascontiguousarray(x @ w.T, dtype=np.float32)


def in_blocks(runs: dict, repeats: int, rounds: int = 3, rest: float = 1.0) -> dict:
    """Median ms of each run, timed in blocks of back-to-back repeats (rounds x the runs in turn).
    Not interleaved run by run: spinning BLAS threads left by one variant would slow the next
    whatever it is. Before each block the process rests `rest` s, so they are asleep again."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            time.sleep(rest)
            fn()
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--embeddings", default=str(SCIFACT_MINILM))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(RESULTS / "blas_contention.md"))
    args = ap.parse_args(argv)

    import numba

    import jpq
    import jpq.index
    import jpq.tree
    from jpq.data import load_beir
    from jpq.encoders import load_precomputed
    from jpq.tree import TreeIndex

    threads = default_threads()
    numba.set_num_threads(threads)
    shipped = jpq.index.matmul_t

    def with_matmul(fn, variant):
        def run():
            jpq.index.matmul_t = jpq.tree.matmul_t = numpy_matmul_t if variant == "numpy" else shipped
            try:
                return fn()
            finally:
                jpq.index.matmul_t = jpq.tree.matmul_t = shipped
        return run

    ds = load_beir(args.data)
    d, q = load_precomputed(Path(args.embeddings), ds.corpus_ids, ds.query_ids, 384)
    split = "test" if "test" in ds.qrels else "dev"
    qt = np.ascontiguousarray(q[ds.query_index(ds.split_query_ids(split))])
    opq = jpq.PQIndex(d.shape[1], 48, opq=True)
    opq.train(d, seed=0)
    opq.add(d)
    plain = jpq.PQIndex(d.shape[1], 48)
    plain.train(d, seed=0)
    plain.add(d)
    tree = TreeIndex(d.shape[1], (8, 8), M=96, centroid_share=0.5)
    tree.train(d, seed=0)
    tree.add(d)

    lines = [f"# NumPy's BLAS threads vs the numba scan after them ({ds.name}: {len(d)} documents)", "",
             f"`{command_line(__file__, argv)}`; {cpu_model()}, {threads} threads, jpq {jpq.__version__}; "
             f"medians of 3 blocks of {args.repeats} back-to-back repeats per variant, 1 s of rest before each block (interleaved repeats would let one variant's spinning threads slow the next), ms. 'numpy': the product by NumPy's `x @ w.T`; "
             "'matmul_t': by `jpq.index.matmul_t` (torch above its small-matrix size).", "",
             "## OPQ PQIndex.search (M = 48, k = 100); the product is the rotation of the queries", "",
             "| queries | numpy | matmul_t | ratio | plain PQ (no rotation) | same results |", "|---|---|---|---|---|---|"]
    for nq in (1, 4, 8, 16, 32, 64, 300):
        x = qt[:nq]
        a = with_matmul(lambda x=x: opq.search(x, 100), "numpy")()
        b = with_matmul(lambda x=x: opq.search(x, 100), "matmul_t")()
        same = bool(np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0]))
        t = in_blocks({"numpy": with_matmul(lambda x=x: opq.search(x, 100), "numpy"),
                         "matmul_t": with_matmul(lambda x=x: opq.search(x, 100), "matmul_t"),
                         "plain": lambda x=x: plain.search(x, 100)}, args.repeats)
        lines.append(f"| {nq} | {t['numpy']:.2f} | {t['matmul_t']:.2f} | {t['matmul_t'] / t['numpy']:.2f}x | "
                     f"{t['plain']:.2f} | {same} |")
        print(lines[-1], flush=True)
    lines += ["", f"## TreeIndex.search ({len(qt)} queries, 8 x 8 leaves, M = 96, k = 100); the product is "
              "the leaf-centroid scores", "", "| beam | numpy | matmul_t | ratio | same results |", "|---|---|---|---|---|"]
    for beam in (3, 6, 12):
        a = with_matmul(lambda b=beam: tree.search(qt, 100, b), "numpy")()
        b_ = with_matmul(lambda b=beam: tree.search(qt, 100, b), "matmul_t")()
        same = bool(np.array_equal(a[1], b_[1]) and np.array_equal(a[0], b_[0]))
        t = in_blocks({"numpy": with_matmul(lambda b=beam: tree.search(qt, 100, b), "numpy"),
                         "matmul_t": with_matmul(lambda b=beam: tree.search(qt, 100, b), "matmul_t")}, args.repeats)
        lines.append(f"| {beam} | {t['numpy']:.2f} | {t['matmul_t']:.2f} | {t['matmul_t'] / t['numpy']:.2f}x | {same} |")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
