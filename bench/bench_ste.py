"""Fused straight-through quantize-and-score vs the plain-PyTorch JPQ formulation, on this CPU.

    python bench/bench_ste.py                  # the table: bench/results/ste_cpu.md (+ .csv row)
    python bench/bench_ste.py --alternatives   # the kernel variants behind kernels/ste.py
    python bench/bench_ste.py --gpu            # gpu_section(): Triton path on a CUDA card
    python -m pytest bench/bench_ste.py        # pytest-benchmark variant (test_bench_*)

The training step: B=64 queries, each with 200 candidate documents, scored against all
N = 64 x 200 = 12800 candidates of the batch (in-batch negatives), D=768, M=96, K=256, fixed
codes; loss = cross-entropy with each query's first own candidate as the positive; forward +
backward to q and the centroids. The baseline is what public JPQ code does:

    x_hat = C[arange(M), codes].reshape(N, D); scores = q @ x_hat.T; loss.backward()

Time: both methods in this process, interleaved run by run (so a busy machine slows both),
median of --repeats runs after warm-up. Peak memory: each method in a fresh subprocess that
builds the inputs, warms up on a tiny problem (kernels compiled and loaded), then resets the
kernel's peak-RSS counter (/proc/self/clear_refs, "5") and reports VmHWM - VmRSS-before over
three full steps, i.e. the real resident peak of everything the step allocates: torch
tensors and the NumPy buffers of the numba kernels alike (torch.profiler would miss the latter).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jpq.kernels.ste import quantize_and_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, append_csv, cpu_model, peak_rss_bytes, reset_peak_rss  # noqa: E402
SHAPE = dict(B=64, per_query=200, D=768, M=96, K=256)
# name -> (metric, given pairs). "ip" all pairs is the case the targets are set on.
CASES = {"ip": ("ip", False), "l2": ("l2", False), "ip-pairs": ("ip", True)}
METHODS = ("fused", "torch")


# --------------------------------------------------------------------------- the two methods
def make_problem(B=64, per_query=200, D=768, M=96, K=256, pairs=False, seed=0):
    """Inputs of one training step (codes also as int64 for the baseline, outside its timing)."""
    gen = torch.Generator().manual_seed(seed)
    N = B * per_query
    ds = D // M
    p = dict(
        q=torch.randn(B, D, generator=gen).requires_grad_(),
        C=torch.randn(M, K, ds, generator=gen).requires_grad_(),
        codes=torch.randint(0, K, (N, M), generator=gen, dtype=torch.uint8),
    )
    p["codes_long"] = p["codes"].long()
    p["arange_m"] = torch.arange(M)
    if pairs:  # each query against its own 200 candidates; the positive is the first
        p["doc_index"] = torch.arange(N).reshape(B, per_query)
        p["target"] = torch.zeros(B, dtype=torch.long)
    else:  # each query against all candidates of the batch; its positive is its first own one
        p["doc_index"] = None
        p["target"] = torch.arange(B) * per_query
    return p


def step_fused(p, metric):
    p["q"].grad = p["C"].grad = None
    scores = quantize_and_score(p["q"], p["C"], codes=p["codes"], doc_index=p["doc_index"], metric=metric)
    loss = F.cross_entropy(-scores if metric == "l2" else scores, p["target"])
    loss.backward()
    return loss


def step_torch(p, metric):
    """The composed-PyTorch JPQ formulation (materialises x_hat, autograd does the rest)."""
    p["q"].grad = p["C"].grad = None
    q, C = p["q"], p["C"]
    M, K, ds = C.shape
    if p["doc_index"] is None:
        x_hat = C[p["arange_m"], p["codes_long"]].reshape(-1, M * ds)  # (N, D)
        scores = q @ x_hat.T
        if metric == "l2":
            scores = (q * q).sum(1, keepdim=True) - 2.0 * scores + (x_hat * x_hat).sum(1)[None, :]
    else:
        x_hat = C[p["arange_m"], p["codes_long"][p["doc_index"]]].reshape(*p["doc_index"].shape, M * ds)
        scores = torch.einsum("bd,bpd->bp", q, x_hat)
        if metric == "l2":
            scores = (q * q).sum(1, keepdim=True) - 2.0 * scores + (x_hat * x_hat).sum(-1)
    loss = F.cross_entropy(-scores if metric == "l2" else scores, p["target"])
    loss.backward()
    return loss


STEPS = {"fused": step_fused, "torch": step_torch}


# --------------------------------------------------------------------------- measurements
def time_side_by_side(case: str, repeats: int, warmup: int = 2) -> dict:
    metric, pairs = CASES[case]
    p = make_problem(pairs=pairs, **SHAPE)
    # same loss and gradients first: the two methods compute the same thing
    losses, grads = {}, {}
    for m in METHODS:
        losses[m] = STEPS[m](p, metric).item()
        grads[m] = (p["q"].grad.clone(), p["C"].grad.clone())
    for a, b in zip(grads["fused"], grads["torch"]):
        err = float((a - b).abs().max() / b.abs().max())
        if err > 1e-4:
            raise AssertionError(f"{case}: fused and torch gradients differ (relative {err:.2e})")
    times = {m: [] for m in METHODS}
    for i in range(warmup + repeats):
        for m in METHODS if i % 2 == 0 else METHODS[::-1]:  # alternate who goes first
            t0 = time.perf_counter()
            STEPS[m](p, metric)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    return times


def _rss_bytes() -> int:
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def child_peak_memory(method: str, case: str) -> None:
    """Subprocess body: print the peak RSS growth (bytes) of `method`'s step as JSON."""
    metric, pairs = CASES[case]
    step = STEPS[method]
    step(make_problem(B=4, per_query=8, D=SHAPE["D"], M=SHAPE["M"], K=SHAPE["K"], pairs=pairs), metric)
    p = make_problem(pairs=pairs, **SHAPE)
    before = _rss_bytes()
    if reset_peak_rss():  # VmHWM := current RSS
        how = "VmHWM after clear_refs"
    else:
        how = "VmHWM not reset: an upper bound"
    for _ in range(3):
        step(p, metric)
    print(json.dumps({"peak_growth_bytes": peak_rss_bytes() - before, "how": how}))


def peak_memory(method: str, case: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, case], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    import numba

    import jpq

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "jpq": jpq.__version__,
    }


def run_table(repeats: int, cases: list[str], write: bool = True) -> list[dict]:
    info = machine_info()
    load_start = os.getloadavg()[0]
    rows = []
    for case in cases:
        times = time_side_by_side(case, repeats)
        mem = {m: peak_memory(m, case) for m in METHODS}
        med = {m: statistics.median(times[m]) for m in METHODS}
        rows.append({
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "case": case, "B": SHAPE["B"], "N": SHAPE["B"] * SHAPE["per_query"], "D": SHAPE["D"],
            "M": SHAPE["M"], "K": SHAPE["K"], "repeats": repeats,
            "fused_ms": round(med["fused"] * 1e3, 2), "torch_ms": round(med["torch"] * 1e3, 2),
            "fused_min_ms": round(min(times["fused"]) * 1e3, 2), "torch_min_ms": round(min(times["torch"]) * 1e3, 2),
            "time_ratio": round(med["fused"] / med["torch"], 3),
            "fused_peak_MB": round(mem["fused"]["peak_growth_bytes"] / 2**20, 1),
            "torch_peak_MB": round(mem["torch"]["peak_growth_bytes"] / 2**20, 1),
            "mem_ratio": round(mem["fused"]["peak_growth_bytes"] / max(1, mem["torch"]["peak_growth_bytes"]), 3),
            "mem_method": mem["fused"]["how"],
            "load_avg_1m_start": round(load_start, 2), "load_avg_1m_end": round(os.getloadavg()[0], 2),
            **info,
        })
        print(f"{case}: fused {rows[-1]['fused_ms']} ms vs torch {rows[-1]['torch_ms']} ms "
              f"(ratio {rows[-1]['time_ratio']}); peak {rows[-1]['fused_peak_MB']} MB vs "
              f"{rows[-1]['torch_peak_MB']} MB (ratio {rows[-1]['mem_ratio']})", flush=True)
    if write:
        write_results(rows)
    return rows


def write_results(rows: list[dict]) -> None:
    append_csv(RESULTS / "ste_cpu.csv", rows)
    r0 = rows[0]
    lines = [
        "# Fused quantize_and_score vs the PyTorch JPQ formulation (CPU)",
        "",
        f"Written by `python bench/bench_ste.py` on {r0['date']}. Machine: {r0['cpu']}, "
        f"{r0['cores']} cores, torch {r0['torch']} ({r0['torch_threads']} threads), numba "
        f"{r0['numba']} ({r0['numba_threads']} threads), jpq {r0['jpq']}. 1-minute load average "
        f"{r0['load_avg_1m_start']} at the start, {rows[-1]['load_avg_1m_end']} at the end "
        f"(2 cores: above ~0.5 means something else was running).",
        "",
        f"One training step: B={r0['B']} queries x N={r0['N']} candidate documents (64 x 200, "
        f"all pairs unless `-pairs`: each query's own 200), D={r0['D']}, M={r0['M']}, K={r0['K']}, "
        "fixed uint8 codes, cross-entropy loss, forward + backward to q and the centroids. "
        "`torch` = `x_hat = C[arange(M), codes].reshape(N, D)`, `q @ x_hat.T`, autograd. "
        f"Time: median of {r0['repeats']} interleaved runs in one process. Peak memory: growth of "
        "the resident set over the post-setup RSS during the step, each method in a fresh "
        f"subprocess ({r0['mem_method']}); includes NumPy buffers, not only torch tensors.",
        "",
        "| case | fused ms | torch ms | time ratio | fused peak MB | torch peak MB | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['fused_ms']} | {r['torch_ms']} | {r['time_ratio']} | "
                     f"{r['fused_peak_MB']} | {r['torch_peak_MB']} | {r['mem_ratio']} |")
    lines += ["", "Targets (case `ip`): time ratio <= 1.0, memory ratio <= 0.5. "
              "Every run appends its rows to `ste_cpu.csv`.", "",
              "On a loaded 2-core machine the fused path's absolute times are inflated most: its "
              "numba kernels and torch use two OpenMP runtimes whose spin-waiting barriers fight "
              "for the cores (measured at load average 3: fused step 260 ms by default, 32 ms with "
              "OMP_WAIT_POLICY=PASSIVE, 17-25 ms on a quieter machine). The sub-millisecond "
              "kernels of the `-pairs` case suffer most.", ""]
    (RESULTS / "ste_cpu.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- alternatives
def alternatives(repeats: int = 9) -> None:
    """Time the kernel variants considered for the CPU path (numbers quoted in kernels/ste.py)."""
    import numba as nb

    from jpq.kernels import ste
    from jpq.kernels.adc import _scores_many_queries
    from jpq.kernels.arrays import FASTMATH

    B, N, M, K, ds = SHAPE["B"], SHAPE["B"] * SHAPE["per_query"], SHAPE["M"], SHAPE["K"], SHAPE["D"] // SHAPE["M"]
    p = make_problem(**SHAPE)
    q, C, codes = p["q"].detach(), p["C"].detach(), p["codes"]
    cn = codes.numpy()
    g = torch.randn(B, N)

    @nb.njit(parallel=True, fastmath=FASTMATH)
    def fwd_doc_major_nb(codes, lut_mkb, out_nb):  # document-major into (N, B); transposed after
        n, m_ = codes.shape
        for i in nb.prange(n):
            acc = out_nb[i]
            acc[:] = 0.0
            for m in range(m_):
                row = lut_mkb[m, codes[i, m]]
                for b in range(acc.shape[0]):
                    acc[b] += row[b]

    @nb.njit(parallel=True, fastmath=FASTMATH)
    def bwd_prange_m(codes, g_nb, G):  # a subspace per task: g (N, B) re-streamed M times
        n, m_ = codes.shape
        for m in nb.prange(m_):
            for i in range(n):
                row = G[m, codes[i, m]]
                for b in range(g_nb.shape[1]):
                    row[b] += g_nb[i, b]

    @nb.njit(parallel=True, fastmath=FASTMATH)
    def bwd_private(codes, g_nb, Gp):  # per-thread private tables over document ranges
        n, m_ = codes.shape
        P = Gp.shape[0]
        share = (n + P - 1) // P
        for t in nb.prange(P):
            for i in range(t * share, min(n, (t + 1) * share)):
                for m in range(m_):
                    row = Gp[t, m, codes[i, m]]
                    for b in range(g_nb.shape[1]):
                        row[b] += g_nb[i, b]

    lut = torch.bmm(C, q.reshape(B, M, ds).transpose(0, 1).transpose(1, 2)).numpy()  # (M, K, B)
    flat = (torch.arange(M) * K)[None, :] + codes.long()  # (N, M) into a (M*K) axis
    rows = torch.arange(N).repeat_interleave(M)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        onehot = torch.sparse_coo_tensor(torch.stack([rows, flat.reshape(-1)]), torch.ones(N * M), (N, M * K)).to_sparse_csr()
        onehot_t = torch.sparse_coo_tensor(torch.stack([flat.reshape(-1), rows]), torch.ones(N * M), (M * K, N)).to_sparse_csr()
    lut_bf = torch.from_numpy(lut).permute(2, 0, 1).reshape(B, M * K).contiguous()
    g_nb = g.T.contiguous().numpy()
    out_nb = np.empty((N, B), np.float32)
    out = np.empty((B, N), np.float32)

    def index_add():
        G = torch.zeros(M, K, B)
        gT = g.T.contiguous()
        for m in range(M):
            G[m].index_add_(0, codes[:, m].long(), gT)

    def private():
        Gp = np.zeros((nb.get_num_threads(), M, K, B), np.float32)
        bwd_private(cn, g_nb, Gp)
        Gp.sum(0)

    def doc_major_nb():
        fwd_doc_major_nb(cn, lut, out_nb)
        torch.from_numpy(out).copy_(torch.from_numpy(out_nb).T)

    def range_transposed():
        ste._grad_table_all_pairs(cn, g.numpy(), np.zeros((M, K, B), np.float32), ste._num_ranges(M))

    variants = [
        ("forward", "numba document-major, B accumulators in registers, into (B, N) (kept)",
         lambda: ste._scores_all_pairs(cn, lut, out)),
        ("forward", "numba document-major into (N, B) + transpose copy", doc_major_nb),
        ("forward", "numba document blocks of 256 (adc._scores_many_queries)",
         lambda: _scores_many_queries(cn, lut, out)),
        ("forward", "one-hot CSR (N, M*K) @ LUT^T (torch.sparse.mm)",
         lambda: torch.sparse.mm(onehot, lut_bf.T.contiguous())),
        ("forward", "torch advanced indexing lut[:, flat].sum(-1)", lambda: lut_bf[:, flat].sum(-1)),
        ("backward G", "numba subspace ranges per thread, documents streamed once (kept)",
         range_transposed),
        ("backward G", "the same reading a transposed copy of g (g.T.contiguous())",
         lambda: ste._grad_table_all_pairs(cn, g.T.contiguous().numpy().T, np.zeros((M, K, B), np.float32),
                                           ste._num_ranges(M))),
        ("backward G", "numba prange over subspaces (g re-read per subspace)",
         lambda: bwd_prange_m(cn, g_nb, np.zeros((M, K, B), np.float32))),
        ("backward G", "numba private tables per thread + sum", private),
        ("backward G", "one-hot CSR^T (M*K, N) @ g^T (torch.sparse.mm)",
         lambda: torch.sparse.mm(onehot_t, g.T.contiguous())),
        # (one scatter_add_ over all subspaces at once would need a (N*M, B) int64 index: 630 MB)
        ("backward G", "torch index_add_ per subspace", index_add),
    ]
    print(f"B={B} N={N} M={M} K={K}, {nb.get_num_threads()} numba / {torch.get_num_threads()} torch "
          f"threads, median and min of {repeats} (load average {os.getloadavg()[0]:.2f})")
    for part, name, fn in variants:
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        print(f"{part:11s} {statistics.median(ts) * 1e3:8.2f} ms  (min {min(ts) * 1e3:7.2f})  {name}")


# --------------------------------------------------------------------------- GPU
def gpu_section(repeats: int = 20) -> list[dict]:
    """Triton path on a CUDA card: correctness against the reference in every mode, then
    forward + backward time and peak memory vs the torch formulation at the benchmark shape.
    For bench/gpu.py to call; returns rows (and prints them)."""
    if not torch.cuda.is_available():
        raise RuntimeError("gpu_section needs a CUDA device")
    dev = torch.device("cuda")
    rows = []
    gen = torch.Generator().manual_seed(0)
    # correctness: modes x metrics at an awkward size, float32 vs the float64 NumPy reference
    B, N, M, K, ds, P = 37, 1001, 24, 256, 8, 13
    for metric in ("ip", "l2"):
        for mode in ("codes", "assign", "pairs"):
            C = torch.randn(M, K, ds, generator=gen)
            codes = torch.randint(0, K, (N, M), generator=gen, dtype=torch.uint8)
            x = C[torch.arange(M)[None, :], codes.long()].reshape(N, M * ds) + 1e-3 * torch.randn(N, M * ds, generator=gen)
            q = torch.randn(B, M * ds, generator=gen)
            idx = torch.randint(0, N, (B, P), generator=gen) if mode == "pairs" else None
            w = None
            errs = {}
            for backend, device in (("reference", "cpu"), ("triton", dev)):
                qq, CC, xx = (t.to(device).requires_grad_() for t in (q, C, x))
                kw = dict(codes=codes.to(device)) if mode != "assign" else {}
                s, r = quantize_and_score(qq, CC, x=xx, doc_index=None if idx is None else idx.to(device),
                                          metric=metric, return_recon_error=True, backend=backend, **kw)
                if w is None:
                    w = (torch.randn(s.shape, generator=gen), torch.randn(r.shape, generator=gen))
                ((s * w[0].to(device)).sum() + (r * w[1].to(device)).sum()).backward()
                errs[backend] = [t.detach().cpu() for t in (s, r, qq.grad, CC.grad, xx.grad)]
            rel = max(float((a - b).abs().max() / max(1.0, float(b.abs().max())))
                      for a, b in zip(errs["triton"], errs["reference"]))
            rows.append({"check": f"{metric}/{mode}", "max_rel_err": rel, "ok": rel < 1e-4})
            print(rows[-1], flush=True)
    # timing at the benchmark shape
    for case in ("ip", "l2", "ip-pairs"):
        metric, pairs = CASES[case]
        p = make_problem(pairs=pairs, **SHAPE)
        p = {k: (v.detach().to(dev).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
             for k, v in p.items()}
        res = {}
        for m in METHODS:
            for _ in range(3):
                STEPS[m](p, metric)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ts = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                STEPS[m](p, metric)
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            res[m] = (statistics.median(ts), (torch.cuda.max_memory_allocated() - base) / 2**20)
        rows.append({"case": case, "gpu": torch.cuda.get_device_name(), "fused_ms": res["fused"][0],
                     "torch_ms": res["torch"][0], "time_ratio": res["fused"][0] / res["torch"][0],
                     "fused_peak_MB": res["fused"][1], "torch_peak_MB": res["torch"][1]})
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- pytest-benchmark
def _bench(benchmark, method, case="ip"):
    metric, pairs = CASES[case]
    p = make_problem(pairs=pairs, **SHAPE)
    STEPS[method](p, metric)  # compile / warm up outside the measurement
    benchmark.pedantic(STEPS[method], args=(p, metric), rounds=5, iterations=1, warmup_rounds=1)


def test_bench_ste_fused(benchmark):
    _bench(benchmark, "fused")


def test_bench_ste_torch_formulation(benchmark):
    _bench(benchmark, "torch")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="timed runs per method (median)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch bench/results")
    ap.add_argument("--alternatives", action="store_true", help="time the CPU kernel variants")
    ap.add_argument("--gpu", action="store_true", help="run gpu_section() (needs CUDA)")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_peak_memory(*args.child)
    elif args.alternatives:
        alternatives(args.repeats)
    elif args.gpu:
        gpu_section()
    else:
        run_table(args.repeats, args.cases, write=not args.no_write)


if __name__ == "__main__":
    main()
