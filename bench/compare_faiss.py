"""jpq vs faiss on the CPU, side by side in one run: ADC search and PQ encode.

    python bench/compare_faiss.py                 # full run (N=200k, D=768, M=96), ~3 min
    python bench/compare_faiss.py --quick         # small sizes, for a smoke test

Search: `jpq.kernels.adc_topk` (backend "cpu", LUT built by `build_lut`) vs faiss
`IndexPQ.search` on the same centroids and codes; encode: `jpq.kernels.assign` vs faiss
`ProductQuantizer.compute_codes`. Same thread count for both. Each figure is the median of
several interleaved runs; the ratio is ours / faiss (below 1 = we are faster).

Peak memory of search is measured in a fresh subprocess per (method, N): the kernel's peak-RSS
counter is reset after setup, so the figure is the extra resident memory the search needed.

Writes bench/results/compare_faiss.{md,csv,png}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import (RESULTS, append_csv, command_line, default_threads, interleaved_medians,  # noqa: E402
                     machine_info, set_threads)


def make_problem(N: int, D: int, M: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((M, 256, D // M)).astype(np.float32)
    codes = rng.integers(0, 256, (N, M), dtype=np.uint8)
    return C, codes


def faiss_pq_index(C, codes, metric="ip"):
    import faiss

    M, K, ds = C.shape
    index = faiss.IndexPQ(M * ds, M, 8, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
    faiss.copy_array_to_vector(C.ravel(), index.pq.centroids)
    index.is_trained = True
    faiss.copy_array_to_vector(codes.ravel(), index.codes)
    index.ntotal = len(codes)
    return index


def bench_search(N, D, M, nqs, k, repeats):
    from jpq.kernels import adc_topk, build_lut

    C, codes = make_problem(N, D, M)
    index = faiss_pq_index(C, codes)
    rng = np.random.default_rng(1)
    rows = []
    for nq in nqs:
        q = rng.standard_normal((nq, D)).astype(np.float32)

        def ours():
            return adc_topk(build_lut(q, C), codes, k, backend="cpu", check=False)

        def theirs():
            return index.search(q, k)

        t = interleaved_medians({"jpq": ours, "faiss": theirs}, repeats=repeats)
        D_ours, I_ours = ours()
        D_f, I_f = theirs()
        agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(I_ours, I_f)]))
        rows.append({"op": "search", "N": N, "D": D, "M": M, "nq": nq, "k": k,
                     "jpq_s": t["jpq"], "faiss_s": t["faiss"], "ratio": t["jpq"] / t["faiss"],
                     "topk_agreement": agree})
        print(f"search N={N} nq={nq}: jpq {t['jpq']*1e3:.1f} ms, faiss {t['faiss']*1e3:.1f} ms, "
              f"ratio {t['jpq']/t['faiss']:.2f}, top-k agreement {agree:.3f}", flush=True)
    return rows


def bench_encode(n, D, M, repeats):
    import faiss

    from jpq.kernels import assign

    C, _ = make_problem(0, D, M)
    x = np.random.default_rng(2).standard_normal((n, D)).astype(np.float32)
    pq = faiss.ProductQuantizer(D, M, 8)
    faiss.copy_array_to_vector(C.ravel(), pq.centroids)
    t = interleaved_medians({"jpq": lambda: assign(x, C, backend="cpu"),
                             "faiss": lambda: pq.compute_codes(x)}, repeats=repeats)
    agree = float((assign(x, C) == pq.compute_codes(x)).mean())
    print(f"encode n={n}: jpq {t['jpq']:.3f} s, faiss {t['faiss']:.3f} s, ratio {t['jpq']/t['faiss']:.2f}, "
          f"codes equal {agree:.6f}", flush=True)
    return [{"op": "encode", "N": n, "D": D, "M": M, "nq": "", "k": "", "jpq_s": t["jpq"],
             "faiss_s": t["faiss"], "ratio": t["jpq"] / t["faiss"], "topk_agreement": agree}]


MEMORY_CHILD = r"""
import json, sys
sys.path.insert(0, {bench!r})
import numpy as np
from machine import peak_rss_bytes, reset_peak_rss, set_threads
from compare_faiss import faiss_pq_index, make_problem
method, N, D, M, nq, k, threads = {args!r}
set_threads(threads)
C, codes = make_problem(N, D, M)
q = np.random.default_rng(1).standard_normal((nq, D)).astype(np.float32)
if method == "jpq":
    from jpq.kernels import adc_topk, build_lut
    run = lambda: adc_topk(build_lut(q, C), codes, k, backend="cpu", check=False)
else:
    index = faiss_pq_index(C, codes)
    run = lambda: index.search(q, k)
run()  # JIT compile / first-touch allocations happen here, outside the measurement
reset_peak_rss()
base = peak_rss_bytes()
run()
print(json.dumps({{"peak_extra_bytes": peak_rss_bytes() - base}}))
"""


def bench_memory(Ns, D, M, nq, k, threads):
    rows = []
    bench_dir = str(Path(__file__).resolve().parent)
    for N in Ns:
        row = {"op": "search-memory", "N": N, "D": D, "M": M, "nq": nq, "k": k}
        for method in ("jpq", "faiss"):
            code = MEMORY_CHILD.format(bench=bench_dir, args=(method, N, D, M, nq, k, threads))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            row[f"{method}_peak_extra_bytes"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
        print(f"search memory N={N} nq={nq}: jpq +{row['jpq_peak_extra_bytes']/2**20:.1f} MiB, "
              f"faiss +{row['faiss_peak_extra_bytes']/2**20:.1f} MiB", flush=True)
        rows.append(row)
    return rows


def write_outputs(search_rows, encode_rows, memory_rows, info, prefix, command="python bench/compare_faiss.py"):
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = ["# jpq vs faiss (CPU)", "",
             f"{info['cpu']}, {info['threads']} threads, jpq {info['jpq']}, faiss {info['faiss']}, "
             f"torch {info['torch']}, {info['date']}. Command: `{command}`.", "",
             "Time ratio = jpq / faiss, same run, medians of interleaved repeats (< 1: jpq faster).", "",
             "| op | N | D | M | nq | k | jpq | faiss | ratio | top-k / code agreement |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in search_rows + encode_rows:
        unit, scale = ("ms", 1e3) if r["op"] == "search" else ("s", 1)
        lines.append(f"| {r['op']} | {r['N']} | {r['D']} | {r['M']} | {r['nq']} | {r['k']} | "
                     f"{r['jpq_s']*scale:.2f} {unit} | {r['faiss_s']*scale:.2f} {unit} | **{r['ratio']:.2f}** | "
                     f"{r['topk_agreement']:.4f} |")
    if memory_rows:
        lines += ["", "Peak extra resident memory of one search call (fresh process, VmHWM reset after "
                  "setup and a warm-up call):", "",
                  "| N | nq | k | jpq | faiss |", "|---|---|---|---|---|"]
        for r in memory_rows:
            lines.append(f"| {r['N']} | {r['nq']} | {r['k']} | {r['jpq_peak_extra_bytes']/2**20:.2f} MiB | "
                         f"{r['faiss_peak_extra_bytes']/2**20:.2f} MiB |")
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{prefix}.md").write_text(md)
    append_csv(RESULTS / f"{prefix}.csv", [{**info, **r} for r in search_rows + encode_rows])
    print(md)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    big = max(r["N"] for r in search_rows)
    sr = [r for r in search_rows if r["N"] == big]
    nq = [r["nq"] for r in sr]
    axes[0].plot(nq, [r["jpq_s"] * 1e3 / r["nq"] for r in sr], "o-", label="jpq adc_topk (cpu)")
    axes[0].plot(nq, [r["faiss_s"] * 1e3 / r["nq"] for r in sr], "s--", label="faiss IndexPQ.search")
    axes[0].set(xscale="log", yscale="log", xlabel="queries per call", ylabel="ms per query",
                title=f"ADC search, N={big}, D={sr[0]['D']}, M={sr[0]['M']}, k={sr[0]['k']}")
    axes[0].legend()
    ns = [r["N"] for r in encode_rows]
    axes[1].plot(ns, [r["jpq_s"] for r in encode_rows], "o-", label="jpq assign (cpu)")
    axes[1].plot(ns, [r["faiss_s"] for r in encode_rows], "s--", label="faiss compute_codes")
    axes[1].set(xscale="log", yscale="log", xlabel="vectors", ylabel="seconds",
                title=f"PQ encode, D={encode_rows[0]['D']}, M={encode_rows[0]['M']}, K=256")
    axes[1].legend()
    fig.suptitle(f"{info['cpu']}, {info['threads']} threads")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{prefix}.png", dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--prefix", default=None,
                   help="output name under bench/results (default compare_faiss, or compare_faiss_quick with --quick)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    info = machine_info(args.threads)
    D, M, k = 768, 96, 10
    if args.quick:
        search_Ns, nqs, enc_ns, mem_Ns, prefix, repeats = [20_000], [1, 64], [20_000], [20_000], "compare_faiss_quick", 3
    else:
        search_Ns, nqs, enc_ns, mem_Ns, prefix, repeats = [50_000, 200_000], [1, 4, 16, 64, 256], \
            [50_000, 200_000], [50_000, 200_000], "compare_faiss", args.repeats
    prefix = args.prefix or prefix
    search_rows = [r for N in search_Ns for r in bench_search(N, D, M, nqs, k, repeats)]
    encode_rows = [r for n in enc_ns for r in bench_encode(n, D, M, max(3, repeats // 2))]
    memory_rows = [] if args.no_memory else bench_memory(mem_Ns, D, M, 64, k, args.threads)
    write_outputs(search_rows, encode_rows, memory_rows, info, prefix, command_line("compare_faiss.py", argv))


if __name__ == "__main__":
    main()
