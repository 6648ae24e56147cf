"""jpq.PQIndex.range_search vs faiss IndexPQ.range_search on the CPU, one run, same index.

    python bench/range_search.py            # N = 200k, D = 768, M = 96, ~1 min
    python bench/range_search.py --quick    # N = 20k: a smoke test

Both search one PQ index (random centroids and codes; faiss gets it through `to_faiss`), inner
product, at radii that leave about 10 / 100 / 1000 results per query (quantiles of the scores
of the first query). Times are medians of interleaved repeats; ratio = jpq / faiss (below 1: jpq
faster). "same results": lims and ids equal, scores within 1e-4. For scale, the last column
times a top-10 `search` of the same queries. faiss' IndexPQ.range_search computes each distance
with a per-vector distance computer rather than the look-up-table scan its search uses, so it is
a slow baseline; what matters is that range_search costs about what a top-k search does. Writes
bench/results/range_search.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, command_line, default_threads, interleaved_medians, machine_info, set_threads  # noqa: E402


def random_index(N: int, D: int, M: int, seed: int = 0):
    import jpq

    rng = np.random.default_rng(seed)
    index = jpq.PQIndex(D, M)
    index.centroids = rng.standard_normal((M, 256, D // M)).astype(np.float32)
    index.codes = rng.integers(0, 256, (N, M), dtype=np.uint8)
    return index


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "range_search.md"))
    args = ap.parse_args(argv)
    set_threads(args.threads)
    info = machine_info(args.threads)
    N, D, M = (20_000, 768, 96) if args.quick else (200_000, 768, 96)
    index = random_index(N, D, M)
    f = index.to_faiss()
    rng = np.random.default_rng(1)
    lines = ["# PQIndex.range_search vs faiss IndexPQ.range_search (CPU)", "",
             f"{info['cpu']}, {args.threads} threads, faiss {info.get('faiss', '?')}, {info['date']}. "
             f"Command: `{command_line('bench/range_search.py', argv)}`.", "",
             f"N = {N}, D = {D}, M = {M}, K = 256, inner product; medians of {args.repeats} interleaved "
             "repeats; ratio = jpq / faiss (< 1: jpq faster).", "",
             "| nq | results / query | jpq | faiss | ratio | same results | jpq search, k = 10 |",
             "|---|---|---|---|---|---|---|"]
    for nq in (1, 16, 64):
        q = rng.standard_normal((nq, D)).astype(np.float32)
        first = index.search(q[:1], 1001)[0][0]  # best first
        for per_query in (10, 100, 1000):
            r = float(first[per_query - 1] + first[per_query]) / 2
            t = interleaved_medians({"jpq": lambda: index.range_search(q, r),
                                     "faiss": lambda: f.range_search(q, r),
                                     "topk": lambda: index.search(q, 10)}, repeats=args.repeats)
            (lims, Dj, Ij), (flims, Df, If) = index.range_search(q, r), f.range_search(q, r)
            same = (np.array_equal(lims, flims) and np.array_equal(Ij, If)
                    and bool(np.allclose(Dj, Df, rtol=1e-4, atol=1e-4)))
            row = (f"| {nq} | {lims[-1] / nq:.0f} | {t['jpq'] * 1e3:.1f} ms | {t['faiss'] * 1e3:.1f} ms "
                   f"| **{t['jpq'] / t['faiss']:.2f}** | {'yes' if same else 'NO'} | {t['topk'] * 1e3:.1f} ms |")
            print(row, flush=True)
            lines.append(row)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
