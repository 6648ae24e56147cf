"""The one-query ADC scan's inner loop, written four ways, on one thread (why the four-query
case ties with faiss on AMD EPYC; none of the variants is in jpq).

    python bench/scan_variants.py        # N = 200k, M = 96, ~30 s

Each variant sums lut[m * 256 + code] over the M codes of every document of one query's table,
as `jpq.kernels.adc._sum_one` does: "one (fastmath)" is that loop (jpq's), "one scalar" the same
without fastmath, "x4 docs" four documents per iteration (four independent sums), "words" the
codes read as 64-bit words and split by shifts. faiss IndexPQ.search of the same query on one
thread is timed in the same run. Writes bench/results/scan_variants.md.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numba as nb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, command_line, machine_info, set_threads  # noqa: E402

LUT_ROW = 256


def variants(fastmath):
    @nb.njit(fastmath=fastmath)
    def one(codes, lut_flat, out):
        for i in range(codes.shape[0]):
            acc = np.float32(0.0)
            for m in range(codes.shape[1]):
                acc += lut_flat[m * LUT_ROW + codes[i, m]]
            out[i] = acc

    @nb.njit(fastmath=False)
    def one_scalar(codes, lut_flat, out):
        for i in range(codes.shape[0]):
            acc = np.float32(0.0)
            for m in range(codes.shape[1]):
                acc += lut_flat[m * LUT_ROW + codes[i, m]]
            out[i] = acc

    @nb.njit(fastmath=fastmath)
    def x4(codes, lut_flat, out):
        n, M = codes.shape
        n4 = n - n % 4
        for i in range(0, n4, 4):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for m in range(M):
                o = m * LUT_ROW
                a0 += lut_flat[o + codes[i, m]]
                a1 += lut_flat[o + codes[i + 1, m]]
                a2 += lut_flat[o + codes[i + 2, m]]
                a3 += lut_flat[o + codes[i + 3, m]]
            out[i] = a0
            out[i + 1] = a1
            out[i + 2] = a2
            out[i + 3] = a3
        for i in range(n4, n):
            acc = np.float32(0.0)
            for m in range(M):
                acc += lut_flat[m * LUT_ROW + codes[i, m]]
            out[i] = acc

    @nb.njit(fastmath=fastmath)
    def words(codes64, lut_flat, out):
        n, W = codes64.shape
        for i in range(n):
            acc = np.float32(0.0)
            for w in range(W):
                c = codes64[i, w]
                base = w * 8 * LUT_ROW
                for j in range(8):
                    acc += lut_flat[base + j * LUT_ROW + ((c >> np.uint64(8 * j)) & np.uint64(255))]
            out[i] = acc

    return {"one (fastmath)": (one, False), "one scalar": (one_scalar, False), "x4 docs": (x4, False),
            "words": (words, True)}


def main(argv=None):
    import faiss

    import jpq.kernels.adc as adc
    from compare_faiss import faiss_pq_index, make_problem
    from jpq.kernels import build_lut

    set_threads(1)
    info = machine_info(1)
    C, codes = make_problem(200_000, 768, 96)
    q = np.random.default_rng(1).standard_normal((1, 768)).astype(np.float32)
    flat = adc._flat_tables(build_lut(q, C))
    lines = ["# One-query ADC scan: inner-loop variants, one thread", "",
             f"{info['cpu']}, faiss {info['faiss']}, {info['date']}. "
             f"Command: `{command_line('bench/scan_variants.py', argv)}`. N = 200000, M = 96; median of 7.", "",
             "| variant | ms | max abs diff to jpq's loop |", "|---|---|---|"]
    ref = None
    for name, (fn, as_words) in variants(adc.FASTMATH).items():
        data = codes.view(np.uint64) if as_words else codes
        out = np.empty(len(codes), np.float32)
        fn(data, flat, out)
        ref = out.copy() if ref is None else ref
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            fn(data, flat, out)
            ts.append(time.perf_counter() - t)
        lines.append(f"| {name} | {statistics.median(ts) * 1e3:.2f} | {np.abs(out - ref).max():.1e} |")
        print(lines[-1], flush=True)
    faiss.omp_set_num_threads(1)
    index = faiss_pq_index(C, codes)
    index.search(q, 10)
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        index.search(q, 10)
        ts.append(time.perf_counter() - t)
    lines.append(f"| faiss IndexPQ.search, k = 10 | {statistics.median(ts) * 1e3:.2f} | - |")
    print(lines[-1])
    out_path = RESULTS / "scan_variants.md"
    out_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
