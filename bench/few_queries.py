"""Few-query CPU paths and the cost of unit-norm search, measured side by side in one process.

    python bench/few_queries.py            # N=200,000, D=768, M=96, 8-bit, ~3 min
    python bench/few_queries.py --quick    # N=50,000, fewer repeats

Four questions, each a ratio of two paths timed in the same run (interleaved medians, so drift
on this noisy machine hits both):

1. `adc_topk` for up to FEW_QUERIES queries runs document-parallel scans that keep the sums in
   registers, four queries per scan and one per query left over (`_few_query_groups`), rather
   than the multi-query kernel, whose small rows (4-12 lanes) are read and written back once per
   sub-quantizer. Here: the dispatcher's time vs the multi-query kernel alone, on the same tables,
   from 1 to 16 queries (FEW_QUERIES is where they cross).
2. A `PQIndex(unit_norm=True)` search multiplies each document's score by 1 / ||x_hat||
   (`adc_topk(..., doc_scale=)`), the scales computed once per index (one `adc_scores` scan,
   `jpq.index.code_norms`) and kept. Here: the scales' one-time cost, then `search` with
   unit_norm vs the plain search of the same index, at 1 / 4 / 64 queries, k=10.
3. `adc_topk`'s default `check=True` validates the code range; uint8 codes with K = 256 cannot
   be out of range, so it skips the pass over them (two NumPy reductions over all codes before,
   2026-12-04: 1.4 ms at N = 200k, a third of a one-query search). Here: check=True vs
   check=False, 1 query, k=10.
4. `adc_topk` (LUT included) vs faiss `IndexPQ.search` on the same codes and centroids, at every
   query count from 1 to 17 and at 64: time per query (faiss parallelises over queries, jpq over
   documents for up to FEW_QUERIES queries and over both beyond); skipped without faiss.

Codes are uniform random (scan time does not depend on their values); centroids are trained by
k-means on random vectors. Writes bench/results/few_queries.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, command_line, default_threads, interleaved_medians, machine_info  # noqa: E402


class MultiQueryOnly:
    """Within this context adc_topk's CPU path takes the multi-query kernel for every query count
    (FEW_QUERIES set to 0), the baseline the few-query scans are timed against."""

    def __enter__(self):
        from jpq.kernels import adc

        self.saved = adc.FEW_QUERIES
        adc.FEW_QUERIES = 0

    def __exit__(self, *exc):
        from jpq.kernels import adc

        adc.FEW_QUERIES = self.saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--M", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="N=50,000 and 7 repeats")
    ap.add_argument("--out", default=str(RESULTS / "few_queries.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats = 50_000, 7

    import numba

    import jpq
    from jpq.index import code_norms
    from jpq.kernels import adc_scores, adc_topk
    from jpq.kernels.adc import FEW_QUERIES

    threads = default_threads()
    numba.set_num_threads(threads)
    rng = np.random.default_rng(0)
    index = jpq.PQIndex(d=args.d, M=args.M, nbits=8, metric="ip")
    index.train(rng.standard_normal((8192, args.d)).astype(np.float32), niter=4)
    index.add_codes(rng.integers(0, 256, (args.n, args.M), dtype=np.uint8))
    unit = copy.copy(index)
    unit.unit_norm = True
    queries = rng.standard_normal((64, args.d)).astype(np.float32)

    rows_scores = []
    multi_only = MultiQueryOnly()
    for nq in (1, 2, 3, 4, 7, 8, 11, 12, 13, 16):
        lut = index.lut(queries[:nq])
        D_few, I_few = adc_topk(lut, index.codes, 10)
        with multi_only:
            D_many, I_many = adc_topk(lut, index.codes, 10)
        np.testing.assert_allclose(D_few, D_many, rtol=1e-5, atol=1e-4)
        agree = float(np.mean(I_few == I_many))

        def many(lut=lut):
            with multi_only:
                return adc_topk(lut, index.codes, 10)

        t = interleaved_medians({"dispatch": lambda lut=lut: adc_topk(lut, index.codes, 10), "many": many},
                                repeats=args.repeats)
        rows_scores.append({"queries": nq, "dispatch_ms": 1e3 * t["dispatch"], "multi_query_kernel_ms": 1e3 * t["many"],
                            "ratio": t["dispatch"] / t["many"], "same_ids": agree})
        print(rows_scores[-1], flush=True)

    # the scales: first search computes them; time that computation on its own too
    t_norms = interleaved_medians({"code_norms": lambda: code_norms(index.centroids, index.codes)},
                                  repeats=args.repeats)["code_norms"]
    # an independent check of the scales: 1 / ||x_hat|| from the decoded vectors, once
    scale = 1.0 / np.linalg.norm(index.decode(index.codes), axis=1)
    rows_search = []
    for nq in (1, 4, 64):
        q = queries[:nq]
        D0, I0 = index.search(q, 10)
        D1, I1 = unit.search(q, 10)  # fills the scale cache
        # the unit-norm search's best scores are those of a full rescaled scan (and not the plain ones)
        full = adc_scores(index.lut(q), index.codes) * scale[None]
        np.testing.assert_allclose(D1[:, 0], full.max(1), rtol=1e-4)
        assert not np.array_equal(I0, I1), "unit_norm changed no ranking: the comparison would be vacuous"
        t = interleaved_medians({"plain": lambda q=q: index.search(q, 10), "unit_norm": lambda q=q: unit.search(q, 10)},
                                repeats=args.repeats)
        rows_search.append({"queries": nq, "plain_ms": 1e3 * t["plain"], "unit_norm_ms": 1e3 * t["unit_norm"],
                            "ratio": t["unit_norm"] / t["plain"]})
        print(rows_search[-1], flush=True)

    lut1 = index.lut(queries[:1])
    t = interleaved_medians({"check": lambda: adc_topk(lut1, index.codes, 10),
                             "no_check": lambda: adc_topk(lut1, index.codes, 10, check=False)}, repeats=args.repeats)
    row_check = {"check_ms": 1e3 * t["check"], "no_check_ms": 1e3 * t["no_check"], "ratio": t["check"] / t["no_check"]}
    print(row_check, flush=True)

    rows_faiss = []
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        from compare_faiss import faiss_pq_index

        faiss.omp_set_num_threads(threads)
        fidx = faiss_pq_index(index.centroids, index.codes)
        for nq in [*range(1, 18), 64]:
            q = queries[:nq]
            _, I_j = adc_topk(index.lut(q), index.codes, 10)
            _, I_f = fidx.search(q, 10)
            agree = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I_j, I_f)]))
            t = interleaved_medians({"jpq": lambda q=q: adc_topk(index.lut(q), index.codes, 10),
                                     "faiss": lambda q=q: fidx.search(q, 10)}, repeats=args.repeats)
            rows_faiss.append({"queries": nq, "jpq_ms": 1e3 * t["jpq"], "faiss_ms": 1e3 * t["faiss"],
                               "ratio": t["jpq"] / t["faiss"], "top10_agreement": agree})
            print(rows_faiss[-1], flush=True)

    info = machine_info(threads)
    out = Path(args.out)
    lines = [
        "# Few-query CPU paths and unit-norm search cost",
        "",
        f"`{command_line(__file__, argv)}`; {info['cpu']}, {threads} threads, jpq {info['jpq']}, {info['date']}.",
        f"N = {args.n:,}, D = {args.d}, M = {args.M}, 8-bit codes, inner product; medians of {args.repeats} "
        "interleaved runs.",
        "",
        f"## adc_topk (k = 10): the few-query scans (up to FEW_QUERIES = {FEW_QUERIES} queries) vs the "
        "multi-query kernel",
        "",
        "Both paths on the same tables; 'same ids' is the fraction of top-10 ids that agree position for position "
        "(the two paths sum in different orders).",
        "",
        "| queries | adc_topk (ms) | multi-query kernel only (ms) | ratio | same ids |",
        "|---|---|---|---|---|",
        *[f"| {r['queries']} | {r['dispatch_ms']:.1f} | {r['multi_query_kernel_ms']:.1f} | {r['ratio']:.2f}x | "
          f"{r['same_ids']:.4f} |" for r in rows_scores],
        "",
        "## PQIndex.search, unit_norm=True vs plain (k = 10)",
        "",
        f"The per-document scales, computed once per index and kept: {1e3 * t_norms:.1f} ms (one `adc_scores` scan).",
        "",
        "| queries | plain (ms) | unit_norm (ms) | ratio |",
        "|---|---|---|---|",
        *[f"| {r['queries']} | {r['plain_ms']:.1f} | {r['unit_norm_ms']:.1f} | {r['ratio']:.2f}x |" for r in rows_search],
        "",
        "## adc_topk's default code check (uint8 codes, K = 256: nothing to scan), 1 query, k = 10",
        "",
        f"check=True {row_check['check_ms']:.2f} ms, check=False {row_check['no_check_ms']:.2f} ms: "
        f"{row_check['ratio']:.2f}x.",
        "",
    ]
    if rows_faiss:
        lines += ["## adc_topk (LUT included) vs faiss IndexPQ.search, k = 10", "",
                  f"faiss {faiss.__version__}, same codes and centroids, same thread count.", "",
                  "| queries | jpq (ms) | faiss (ms) | jpq ms / query | ratio | top-10 agreement |",
                  "|---|---|---|---|---|---|",
                  *[f"| {r['queries']} | {r['jpq_ms']:.1f} | {r['faiss_ms']:.1f} | {r['jpq_ms'] / r['queries']:.2f} | "
                    f"{r['ratio']:.2f}x | {r['top10_agreement']:.4f} |" for r in rows_faiss], ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "n": args.n, "d": args.d, "M": args.M,
                                                    "repeats": args.repeats, "few_queries_topk": rows_scores,
                                                    "code_norms_ms": 1e3 * t_norms, "search": rows_search,
                                                    "adc_topk_check": row_check, "vs_faiss": rows_faiss},
                                                   indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
