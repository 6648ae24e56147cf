"""GPU check and benchmark of the Triton kernels, against the references and plain torch.

    python bench/gpu.py                 # full sizes (N = 1,000,000 documents / rows)
    python bench/gpu.py --quick         # N = 100,000: a fast first look on a new card
    python bench/gpu.py --cpu-dry-run   # tiny sizes under TRITON_INTERPRET=1: tests this script

On a machine without CUDA (and without --cpu-dry-run) it prints "no CUDA device: nothing to
check" and exits 0. Otherwise, for every section in SECTIONS and every size it
  1. checks the Triton result against the reference on a subsample (codes and ids exactly,
     except at near-ties, which are counted; scores with atol = 2e-6 * M * max|lut|),
  2. times the Triton path and a plain-torch equivalent with triton.testing.do_bench (median),
  3. reports achieved bandwidth = compulsory bytes (inputs read once + outputs written once)
     / time, and its fraction of the card's HBM peak when the card is known,
then prints one markdown table and appends it to bench/results/gpu.md. Exit status 1 when a
check failed or a case raised, so a CI job can gate on it.

Timings call the kernel launchers (adc_scores_triton, assign_triton) and adc_topk(check=False)
directly so input validation (a full pass over codes / x) is not counted; each correctness
check goes through the public API (backend="triton") instead, so dispatch is exercised too.

To add a section: write `def section_xxx(ctx) -> None` that calls `ctx.case(...)` per size
and append it to SECTIONS.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.md"

# HBM peak in bytes/s, matched as substrings of torch.cuda.get_device_name(), most specific
# first ("NVIDIA H100 PCIe" must not match the SXM entry "H100").
HBM_PEAK = {
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H100": 3.35e12,  # SXM, reported as "NVIDIA H100 80GB HBM3"
    "H200": 4.8e12,
    "A100": 2.0e12,  # 80 GB parts; the 40 GB A100 is 1.555e12
}


def hbm_peak(device_name: str) -> float | None:
    for key, peak in HBM_PEAK.items():
        if key in device_name:
            return peak
    return None


# --------------------------------------------------------------------------- harness
@dataclass
class Row:
    section: str
    shape: str
    check: str = ""
    triton_ms: float | None = None
    torch_ms: float | None = None
    nbytes: float | None = None
    triton_peak: int | None = None  # bytes allocated on the device above the inputs, one call
    torch_peak: int | None = None
    failed: bool = False


@dataclass
class Context:
    device: "torch.device"
    size: str  # "full" | "quick" | "dry"
    peak: float | None
    rows: list[Row] = field(default_factory=list)

    def bench(self, fn, grad_to_none=None) -> float:
        """Median milliseconds of fn()."""
        if self.device.type == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
        times = []  # --cpu-dry-run: the interpreter has no device timer; these numbers mean nothing
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_bytes(self, fn) -> int | None:
        """Peak device bytes allocated by one fn() call above what was allocated before it."""
        if self.device.type != "cuda":
            return None
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def measure(self, row: Row, triton_fn, torch_fn, grad_to_none=None) -> None:
        """Median time and peak memory of the Triton path and its plain-torch baseline."""
        row.triton_ms = self.bench(triton_fn, grad_to_none=grad_to_none)
        row.torch_ms = self.bench(torch_fn, grad_to_none=grad_to_none)
        for fn, attr in ((triton_fn, "triton_peak"), (torch_fn, "torch_peak")):
            for t in grad_to_none or ():
                t.grad = None  # count the gradients a step allocates
            setattr(row, attr, self.peak_bytes(fn))

    def case(self, section: str, shape: str, fn) -> None:
        """Run one size of one section; fn(row) fills the row. An exception becomes a failed row."""
        row = Row(section, shape)
        print(f"[{section}] {shape} ...", flush=True)
        try:
            fn(row)
        except Exception as exc:  # keep going: one broken size must not hide the others
            traceback.print_exc()
            row.check = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            row.failed = True
        self.rows.append(row)
        print(f"    {row.check}  triton {_fmt_ms(row.triton_ms)} ms  torch {_fmt_ms(row.torch_ms)} ms", flush=True)
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _fmt_ms(v):
    return "—" if v is None else f"{v:.3f}"


def _fmt_mb(v):
    return "—" if v is None else f"{v / 2**20:.0f}"


def markdown_table(ctx: Context, header: str) -> str:
    lines = [
        header,
        "",
        "| section | shape | check | triton ms | torch ms | speedup | GB/s | % HBM peak "
        "| triton peak MB | torch peak MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ctx.rows:
        speed = f"{r.torch_ms / r.triton_ms:.2f}x" if r.triton_ms and r.torch_ms else "—"
        gbs = pct = "—"
        if r.nbytes and r.triton_ms:
            bw = r.nbytes / (r.triton_ms * 1e-3)
            gbs = f"{bw / 1e9:.0f}"
            if ctx.peak:
                pct = f"{100 * bw / ctx.peak:.0f}%"
        lines.append(
            f"| {r.section} | {r.shape} | {r.check} | {_fmt_ms(r.triton_ms)} | {_fmt_ms(r.torch_ms)} "
            f"| {speed} | {gbs} | {pct} | {_fmt_mb(r.triton_peak)} | {_fmt_mb(r.torch_peak)} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plain-torch baselines
def torch_adc_scores(lut, codes, max_elems: int = 1 << 28):
    """(nq, M, K) x (N, M) -> (nq, N) with one index_select per document chunk.

    The gathered (nq, chunk, M) block is capped at max_elems (1 GiB of float32).
    """
    import torch

    nq, M, K = lut.shape
    N = codes.shape[0]
    flat = lut.reshape(nq, M * K)
    offs = torch.arange(M, device=codes.device) * K
    out = torch.empty((nq, N), dtype=lut.dtype, device=lut.device)
    step = max(1, max_elems // max(1, nq * M))
    for s in range(0, N, step):
        idx = (codes[s : s + step].long() + offs).reshape(-1)
        out[:, s : s + step] = flat.index_select(1, idx).reshape(nq, -1, M).sum(-1)
    return out


def torch_adc_topk(lut, codes, k: int, metric: str = "ip"):
    import torch

    return torch.topk(torch_adc_scores(lut, codes), min(k, codes.shape[0]), dim=1, largest=metric == "ip")


def torch_assign(x, C, max_elems: int = 1 << 28):
    """Chunked ||c||^2 - 2 x.c via baddbmm, then argmin (first minimum: smallest k)."""
    import torch

    n, D = x.shape
    M, K, ds = C.shape
    cnorm = (C * C).sum(-1).unsqueeze(1)  # (M, 1, K)
    Ct = C.transpose(1, 2)  # (M, ds, K)
    out = torch.empty((n, M), dtype=torch.uint8, device=x.device)
    step = max(1, max_elems // (M * K))
    for s in range(0, n, step):
        xs = x[s : s + step].reshape(-1, M, ds).transpose(0, 1)  # (M, c, ds)
        dist = torch.baddbmm(cnorm, xs, Ct, alpha=-2.0)  # (M, c, K)
        out[s : s + step] = dist.argmin(-1).T.to(torch.uint8)
    return out


# --------------------------------------------------------------------------- sections
def _generator(ctx, seed: int):
    import torch

    return torch.Generator(device=ctx.device).manual_seed(seed)


def _adc_inputs(ctx, nq, N, M, K, ds=8):
    """A realistic LUT (queries x random centroids, built with build_lut) and uniform codes."""
    import torch
    from jpq.kernels import build_lut

    g = _generator(ctx, 0)
    q = torch.randn((nq, M * ds), generator=g, device=ctx.device)
    C = torch.randn((M, K, ds), generator=g, device=ctx.device)
    lut = build_lut(q, C, metric="ip")
    codes = torch.randint(0, K, (N, M), generator=g, device=ctx.device, dtype=torch.uint8)
    return lut, codes


def _adc_sizes(ctx):
    # (nq, N, M, K); the awkward last size exercises every mask (N, M not multiples of a block)
    if ctx.size == "dry":
        return [(1, 300, 8, 16), (5, 301, 3, 7), (3, 50, 96, 256)]
    N = 1_000_000 if ctx.size == "full" else 100_000
    return [(1, N, 96, 256), (64, N, 96, 256), (1024, N, 96, 256), (64, N, 16, 256), (5, 100_003, 3, 256)]


def section_adc_scores(ctx):
    import numpy as np
    from jpq.kernels import adc_scores
    from jpq.kernels.adc import adc_scores_reference
    from jpq.kernels.adc_triton import adc_scores_triton

    for nq, N, M, K in _adc_sizes(ctx):

        def run(row, nq=nq, N=N, M=M, K=K):
            lut, codes = _adc_inputs(ctx, nq, N, M, K)
            scores = adc_scores(lut, codes, backend="triton")
            rng = np.random.default_rng(0)
            qs = np.sort(rng.choice(nq, min(nq, 4), replace=False))
            docs = np.sort(rng.choice(N, min(N, 4096), replace=False))
            ref = adc_scores_reference(lut[qs].cpu().numpy(), codes[docs].cpu().numpy())
            got = scores[qs][:, docs].cpu().numpy()
            atol = 2e-6 * M * float(lut.abs().max())
            err = float(np.abs(got - ref).max())
            ok = np.allclose(got, ref, rtol=1e-5, atol=atol)
            row.check = f"ok (max err {err:.1e})" if ok else f"FAIL max err {err:.2e} > atol {atol:.1e}"
            row.failed = not ok
            del scores
            ctx.measure(row, lambda: adc_scores_triton(lut, codes), lambda: torch_adc_scores(lut, codes))
            row.nbytes = N * M + lut.numel() * 4 + nq * N * 4

        ctx.case("adc_scores", f"nq={nq} N={N} M={M} K={K}", run)


def _check_topk(row, D, I, lut, codes, k: int, qs=None):
    """Fill row.check from adc_topk's (D, I) against float64 torch scores of a few queries (`qs`,
    default 4 spread over nq) over all N documents: ids exactly except at near-ties (both ids with
    the same reference score within atol), values within atol = 2e-6 * M * max|lut|. Returns the
    reference scores (the caller frees them)."""
    import torch

    nq, M, _ = lut.shape
    N = codes.shape[0]
    if qs is None:
        qs = torch.arange(0, nq, max(1, nq // 4), device=lut.device)[:4]
    ref = torch_adc_scores(lut[qs].double(), codes)  # (len(qs), N) float64
    kk = min(k, N)
    ref_v, ref_i = torch.topk(ref, kk, dim=1)
    Dq, Iq = D[qs][:, :kk].double(), I[qs][:, :kk]
    tol = 2e-6 * M * float(lut.abs().max())
    problems = []
    if bool((Iq < 0).any()) or bool((Iq >= N).any()):
        problems.append("ids out of range")
    else:
        if float((Dq - ref.gather(1, Iq)).abs().max()) > tol:
            problems.append("D != score of I")
        if float((Dq - ref_v).abs().max()) > tol:
            problems.append("top-k values differ")
        differ = Iq != ref_i
        # a differing id is fine only at a near-tie: both ids have the same reference score
        tie_ok = (ref.gather(1, Iq) - ref.gather(1, ref_i)).abs() <= tol
        if bool((differ & ~tie_ok).any()):
            problems.append("ids differ beyond ties")
    if k > N and not problems:
        fill = torch.finfo(torch.float32).max  # metric "ip": -FLT_MAX past N
        if bool((I[qs][:, N:] != -1).any()) or bool((D[qs][:, N:] != -fill).any()):
            problems.append("no -1 / -FLT_MAX padding past N")
    n_ties = int(differ.sum()) if not problems else 0
    row.check = "FAIL " + ", ".join(problems) if problems else f"ok ({n_ties} near-tie ids)"
    row.failed = bool(problems)
    return ref


def section_adc_topk(ctx, k: int = 10):
    import torch
    from jpq.kernels import adc_topk

    for nq, N, M, K in _adc_sizes(ctx):

        def run(row, nq=nq, N=N, M=M, K=K):
            lut, codes = _adc_inputs(ctx, nq, N, M, K)
            D, I = adc_topk(lut, codes, k, metric="ip", backend="triton")
            ref = _check_topk(row, D, I, lut, codes, k)
            del D, I, ref
            ctx.measure(
                row,
                lambda: adc_topk(lut, codes, k, backend="triton", check=False),
                lambda: torch_adc_topk(lut, codes, k),
            )
            row.nbytes = N * M + lut.numel() * 4 + nq * k * (4 + 8)

        ctx.case("adc_topk", f"nq={nq} N={N} M={M} K={K} k={k}", run)


def _assign_sizes(ctx):
    # (n, D, M, K): ds = 8 (broadcast path), ds = 24 (tl.dot path, padded to 32), ds = 1, K = 7
    if ctx.size == "dry":
        return [(70, 24, 3, 16), (33, 24, 1, 256), (20, 3, 3, 7)]
    n = 1_000_000 if ctx.size == "full" else 100_000
    return [(n, 768, 96, 256), (n, 768, 32, 256), (100_003, 96, 96, 256), (100_003, 96, 12, 7)]


def _near_tie_mismatches(x, C, got, ref) -> tuple[int, int]:
    """(near-tie mismatches, real mismatches). A mismatch is a near-tie when the chosen
    centroid's float64 distance is within what float32 can resolve of the best one: every path
    computes ||c||^2 - 2 x.c, whose rounding error scales with ||x||^2 + ||c||^2, not with the
    distance (at ds = 1 neighbouring centroids are often closer than that). The CPU fast path
    differs from the float64 reference at the same places."""
    import numpy as np

    M, K, ds = C.shape
    xs = x.astype(np.float64).reshape(-1, M, ds)
    C64 = C.astype(np.float64)
    eps = float(np.finfo(np.float32).eps)
    ties = bad = 0
    for r, m in np.argwhere(got != ref):
        d = ((xs[r, m] - C64[m]) ** 2).sum(-1)
        scale = (xs[r, m] ** 2).sum() + (C64[m, got[r, m]] ** 2).sum() + (C64[m, ref[r, m]] ** 2).sum()
        if d[got[r, m]] <= d[ref[r, m]] * (1 + 1e-5) + 8 * ds * eps * scale:
            ties += 1
        else:
            bad += 1
    return ties, bad


def section_assign(ctx):
    import numpy as np
    import torch
    from jpq.kernels import assign
    from jpq.kernels.assign import assign_reference
    from jpq.kernels.assign_triton import assign_triton

    for n, D, M, K in _assign_sizes(ctx):

        def run(row, n=n, D=D, M=M, K=K):
            ds = D // M
            g = _generator(ctx, 1)
            # data near the centroids, as in a trained quantizer: centroid + small noise
            C = torch.randn((M, K, ds), generator=g, device=ctx.device)
            pick = torch.randint(0, K, (n, M), generator=g, device=ctx.device)
            x = C[torch.arange(M, device=ctx.device), pick].reshape(n, D)
            x += 0.3 * torch.randn((n, D), generator=g, device=ctx.device)
            codes = assign(x, C, backend="triton")
            rows = np.sort(np.random.default_rng(0).choice(n, min(n, 4096), replace=False))
            x_s, C_np = x[rows].cpu().numpy(), C.cpu().numpy()
            ref = assign_reference(x_s, C_np)
            ties, bad = _near_tie_mismatches(x_s, C_np, codes[rows].cpu().numpy(), ref)
            row.check = f"ok ({ties} near-ties)" if not bad else f"FAIL {bad} codes differ ({ties} near-ties)"
            row.failed = bad > 0
            del codes, pick
            ctx.measure(row, lambda: assign_triton(x, C), lambda: torch_assign(x, C))
            row.nbytes = x.numel() * 4 + C.numel() * 4 + n * M

        ctx.case("assign", f"n={n} D={D} M={M} K={K}", run)


def section_ste(ctx):
    """Fused straight-through quantize-and-score (jpq.kernels.quantize_and_score), forward +
    backward, against x_hat = C[arange(M), codes].reshape(n, D); s = q @ x_hat.T."""
    import importlib.util

    # written by someone else, possibly after this script: import lazily, skip when missing
    for module in ("jpq.kernels.ste", "jpq.kernels.ste_triton"):
        if importlib.util.find_spec(module) is None:
            print(f"[ste] {module} not found: section skipped")
            return
    import torch
    from jpq.kernels.ste import quantize_and_score

    def fused(q, C, codes):
        return quantize_and_score(q, C, codes=codes, backend="triton")

    def plain(q, C, codes):
        M, _, ds = C.shape
        x_hat = C[torch.arange(M, device=C.device), codes.long()].reshape(codes.shape[0], M * ds)
        return q @ x_hat.T

    sizes = (
        [(3, 50, 24, 3, 16)]
        if ctx.size == "dry"
        else [(64, 100_000, 768, 96, 256), (256, 100_003, 768, 48, 256), (16, 100_003, 24, 3, 256)]
    )
    for nq, n, D, M, K in sizes:

        def run(row, nq=nq, n=n, D=D, M=M, K=K):
            ds = D // M
            g = _generator(ctx, 2)
            q0 = torch.randn((nq, D), generator=g, device=ctx.device)
            C0 = torch.randn((M, K, ds), generator=g, device=ctx.device)
            codes = torch.randint(0, K, (n, M), generator=g, device=ctx.device, dtype=torch.uint8)
            grad_s = torch.randn((nq, n), generator=g, device=ctx.device)

            def fwd_bwd(fn, dtype):
                q = q0.to(dtype).clone().requires_grad_()  # fresh leaves: q0/C0 stay untouched
                C = C0.to(dtype).clone().requires_grad_()
                s = fn(q, C, codes)
                s.backward(grad_s.to(dtype))
                return s.detach(), q.grad, C.grad

            got = fwd_bwd(fused, torch.float32)
            ref = fwd_bwd(plain, torch.float64)
            # Frobenius-relative error against a float64 reference: the reductions are long
            # (D for s, n for dq, nq * n / K for dC) and their order differs from torch's.
            # float32 accumulation lands near 1e-6 here; TF32 products (~3e-4) would fail 1e-5.
            errs = [float((a.double() - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, ref)]
            worst = max(errs)
            ok = worst <= 1e-5
            row.check = f"{'ok' if ok else 'FAIL'} (rel err s/dq/dC {errs[0]:.0e}/{errs[1]:.0e}/{errs[2]:.0e})"
            row.failed = not ok
            q = q0.clone().requires_grad_()
            C = C0.clone().requires_grad_()

            def step(fn):
                def go():
                    fn(q, C, codes).backward(grad_s)

                return go

            ctx.measure(row, step(fused), step(plain), grad_to_none=[q, C])

        ctx.case("ste fwd+bwd", f"nq={nq} n={n} D={D} M={M} K={K}", run)


def section_ste_pairs(ctx):
    """The fused op in the shape JPQ training uses (jpq.train.JPQTrainer._scores): B queries, each
    with its own P candidates (doc_index), codes and exact vectors x of the unique candidates,
    the reconstruction error returned too; loss = sum(g * s) + sum(recon), forward + backward.
    Plain torch: x_hat = C[m, codes] gathered, s = einsum(q, x_hat[doc_index]) with the op's
    straight-through gradient to x (x_hat + x - x.detach()), recon = ||x - x_hat||^2."""
    import importlib.util

    if importlib.util.find_spec("jpq.kernels.ste_triton") is None:
        print("[ste pairs] jpq.kernels.ste_triton not found: section skipped")
        return
    import torch
    from jpq.kernels.ste import quantize_and_score

    def fused(q, C, codes, x, idx):
        s, r = quantize_and_score(q, C, codes=codes, x=x, doc_index=idx, return_recon_error=True,
                                  backend="triton")
        return s, r

    def plain(q, C, codes, x, idx):
        M, _, ds = C.shape
        x_hat = C[torch.arange(M, device=C.device), codes.long()].reshape(codes.shape[0], M * ds)
        x_st = x_hat + (x - x.detach())  # value x_hat; dscores/dx straight through, as the op
        s = torch.einsum("bd,bpd->bp", q, x_st[idx])
        return s, ((x - x_hat) ** 2).sum(1)

    # (B, P, N unique candidates, D, M): SciFact-like JPQ steps at 32x and 96x, and a larger batch
    sizes = [(3, 7, 12, 24, 3)] if ctx.size == "dry" else [(32, 101, 3000, 384, 48), (32, 101, 3000, 384, 16),
                                                             (256, 201, 50_000, 768, 96)]
    for B, P, N, D, M in sizes:

        def run(row, B=B, P=P, N=N, D=D, M=M):
            ds, K = D // M, 256
            g = _generator(ctx, 3)
            q0 = torch.randn((B, D), generator=g, device=ctx.device)
            C0 = torch.randn((M, K, ds), generator=g, device=ctx.device)
            codes = torch.randint(0, K, (N, M), generator=g, device=ctx.device, dtype=torch.uint8)
            x0 = torch.randn((N, D), generator=g, device=ctx.device)
            idx = torch.randint(0, N, (B, P), generator=g, device=ctx.device)
            gs = torch.randn((B, P), generator=g, device=ctx.device)
            gr = torch.randn((N,), generator=g, device=ctx.device)

            def fwd_bwd(fn, dtype):
                q, C, x = (t.to(dtype).clone().requires_grad_() for t in (q0, C0, x0))
                s, r = fn(q, C, codes, x, idx)
                ((s * gs.to(dtype)).sum() + (r * gr.to(dtype)).sum()).backward()
                return s.detach(), r.detach(), q.grad, C.grad, x.grad

            got = fwd_bwd(fused, torch.float32)
            ref = fwd_bwd(plain, torch.float64)
            errs = [float((a.double() - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, ref)]
            ok = max(errs) <= 1e-5
            row.check = f"{'ok' if ok else 'FAIL'} (rel err s/r/dq/dC/dx max {max(errs):.0e})"
            row.failed = not ok
            q, C, x = (t.clone().requires_grad_() for t in (q0, C0, x0))

            def step(fn):
                def go():
                    s, r = fn(q, C, codes, x, idx)
                    ((s * gs).sum() + (r * gr).sum()).backward()
                return go

            ctx.measure(row, step(fused), step(plain), grad_to_none=[q, C, x])

        ctx.case("ste pairs fwd+bwd", f"B={B} P={P} N={N} D={D} M={M}", run)


def check_against_cpu(row, D, I, D_cpu, I_cpu, M: int, ran_there: bool = True) -> None:
    """Fill row.check / row.failed for a device top-k (D, I torch) against the same search on the
    CPU (D_cpu, I_cpu NumPy): scores within 2e-6 * M * max|D|, ids equal on >= 99% of the entries
    (they may differ at near-ties only), and the search ran on the device."""
    import numpy as np

    tol = 2e-6 * M * max(1.0, float(np.abs(D_cpu).max()))
    d_err = float(np.abs(D.cpu().numpy() - D_cpu).max())
    same = float((I.cpu().numpy() == I_cpu).mean())
    ok = ran_there and d_err <= tol and same >= 0.99
    row.check = (f"{'ok' if ok else 'FAIL'} (ids equal {same:.3f}, max |dD| {d_err:.1e}"
                 f"{'' if ran_there else ', NOT run on the device'})")
    row.failed = not ok


def section_index_search(ctx, k: int = 10):
    """jpq.PQIndex.search end to end for torch queries on the device (rotation, LUT, Triton top-k,
    cached device copies of the codes), checked against the index's own CPU path on 4 queries;
    baseline: the same LUT with the plain-torch gather top-k. Also with unit_norm=True (the
    per-document scales computed on the device each search; the baseline stays unscaled)."""
    import numpy as np
    import torch
    from jpq import PQIndex
    from jpq.kernels import build_lut

    sizes = [(3, 500, 24, 3)] if ctx.size == "dry" else [(1, 1_000_000, 768, 96), (64, 1_000_000, 768, 96)]
    for (nq, N, d, M), unit_norm in ((size, u) for size in sizes for u in (False, True)):

        def run(row, nq=nq, N=N, d=d, M=M, unit_norm=unit_norm):
            rng = np.random.default_rng(4)
            index = PQIndex(d, M, nbits=8, metric="ip", opq=True, unit_norm=unit_norm)
            index.centroids = rng.standard_normal((M, 256, d // M)).astype(np.float32)
            index.rotation = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
            index.codes = rng.integers(0, 256, (N, M), dtype=np.uint8)
            q = torch.from_numpy(rng.standard_normal((nq, d)).astype(np.float32)).to(ctx.device)
            backend = "auto" if ctx.device.type == "cuda" else "triton"  # auto picks Triton for CUDA
            D, I = index.search(q, k, backend=backend)
            ran_there = index._device_cache is not None and index._device_cache[0] == q.device
            D_cpu, I_cpu = index.search(q.cpu().numpy(), k, backend="cpu")  # every query
            check_against_cpu(row, D, I, D_cpu, I_cpu, M, ran_there)
            codes, C, R = index._device_arrays(q.device)

            def plain():
                lut = build_lut((q @ R.T).contiguous(), C, "ip")
                return torch_adc_topk(lut, codes, k)

            ctx.measure(row, lambda: index.search(q, k, backend=backend), plain)
            row.nbytes = N * M + nq * k * 12

        ctx.case("PQIndex.search", f"nq={nq} N={N} d={d} M={M} k={k}{' unit_norm' if unit_norm else ''}", run)

    # filtered: a faiss IDSelector keeping a tenth of the ids, the selected codes gathered on the device
    import faiss

    nq, N, d, M = sizes[-1]

    def filtered(row):
        rng = np.random.default_rng(5)
        index = PQIndex(d, M, nbits=8, metric="ip")
        index.centroids = rng.standard_normal((M, 256, d // M)).astype(np.float32)
        # ids: every third integer, so positions and ids differ
        index.add_codes(rng.integers(0, 256, (N, M), dtype=np.uint8), ids=np.arange(N, dtype=np.int64) * 3)
        batch = np.sort(rng.choice(N, max(1, N // 10), replace=False)).astype(np.int64) * 3
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(batch))
        q = torch.from_numpy(rng.standard_normal((nq, d)).astype(np.float32)).to(ctx.device)
        backend = "auto" if ctx.device.type == "cuda" else "triton"
        D, I = index.search(q, k, backend=backend, params=params)
        ran_there = index._device_cache is not None and index._device_cache[0] == q.device
        D_cpu, I_cpu = index.search(q.cpu().numpy(), k, backend="cpu", params=params)
        check_against_cpu(row, D, I, D_cpu, I_cpu, M, ran_there)
        if not np.isin(I_cpu[I_cpu >= 0], batch).all():
            row.check, row.failed = "FAIL an unselected id returned", True
        ctx.measure(row, lambda: index.search(q, k, backend=backend, params=params),
                    lambda: index.search(q, k, backend=backend))  # baseline: the unfiltered search
        row.nbytes = N // 10 * M + nq * k * 12

    ctx.case("PQIndex.search filtered (torch ms: unfiltered)", f"nq={nq} N={N} d={d} M={M} k={k} 10% selected",
             filtered)


def section_ivf_search(ctx, k: int = 10):
    """jpq.kernels.ivf.ivf_search (inverted lists, the TreeIndex scan) on the device, checked
    against its CPU path on every query; baseline: the same candidate rows scored by a plain
    torch gather and ranked the same way."""
    import numpy as np
    import torch
    from jpq.kernels.ivf import ivf_search
    from jpq.kernels.ivf_triton import candidate_rows, ivf_search_triton, probed_lengths, rank_candidates

    if ctx.size == "dry":
        sizes = [(3, 600, 8, 16, 12, 4)]
    else:
        N = 1_000_000 if ctx.size == "full" else 100_000
        sizes = [(1, N, 96, 256, 1024, 16), (64, N, 96, 256, 1024, 16), (1024, N, 96, 256, 1024, 16)]
    for nq, N, M, K, n_lists, w in sizes:

        def run(row, nq=nq, N=N, M=M, K=K, n_lists=n_lists, w=w):
            rng = np.random.default_rng(6)
            ds = 8
            q = rng.standard_normal((nq, M * ds)).astype(np.float32)
            C = rng.standard_normal((M, K, ds)).astype(np.float32)
            codes = rng.integers(0, K, (N, M), dtype=np.uint8)
            leaf = rng.integers(0, n_lists, N)
            ids = np.argsort(leaf, kind="stable")
            offsets = np.concatenate([[0], np.cumsum(np.bincount(leaf, minlength=n_lists))])
            probes = np.stack([rng.choice(n_lists, w, replace=False) for _ in range(nq)]).astype(np.int64)
            list_codes = np.ascontiguousarray(codes[ids])
            dev = ctx.device
            qt, Ct, codes_t = (torch.from_numpy(x).to(dev) for x in (q, C, list_codes))
            off_t, ids_t, probes_t = (torch.from_numpy(np.asarray(x, np.int64)).to(dev) for x in (offsets, ids, probes))
            D, I = ivf_search(qt, Ct, codes_t, off_t, ids_t, probes_t, k, backend="triton")
            D_cpu, I_cpu = ivf_search(q, C, list_codes, offsets, ids, probes, k, backend="cpu")
            check_against_cpu(row, D, I, D_cpu, I_cpu, M)
            from jpq.kernels.adc import _build_lut_torch

            def plain():
                lut = _build_lut_torch(qt, Ct, "ip")
                rows, valid = candidate_rows(*probed_lengths(off_t, probes_t))
                m = torch.arange(M, device=dev)
                scores = torch.stack([lut[i][m, codes_t[rows[i]].long()].sum(1) for i in range(nq)])
                return rank_candidates(scores, valid, ids_t[rows], k, largest=True)

            ctx.measure(row, lambda: ivf_search_triton(qt, Ct, codes_t, off_t, ids_t, probes_t, k), plain)
            row.nbytes = int((offsets[probes + 1] - offsets[probes]).sum()) * (M + 8) + nq * k * 12

        ctx.case("ivf_search", f"nq={nq} N={N} M={M} K={K} lists={n_lists} probes={w} k={k}", run)


def section_tree_search(ctx, k: int = 10):
    """jpq.TreeIndex.search for torch queries on the device (routing on the CPU, the scan by
    ivf_search's Triton path against cached device copies of the lists) against the same search
    on the CPU (the "torch" column here is the CPU path, as a baseline)."""
    import numpy as np
    import torch
    from jpq.tree import TreeIndex

    sizes = [(5, 2000, 16, 4, (3, 4), 3)] if ctx.size == "dry" else [(64, 200_000, 128, 16, (16, 16), 16)]
    for nq, N, d, M, branching, beam in sizes:

        def run(row, nq=nq, N=N, d=d, M=M, branching=branching, beam=beam):
            rng = np.random.default_rng(7)
            centers = rng.standard_normal((64, d)).astype(np.float32)
            x = (centers[rng.integers(0, 64, N)] + 0.5 * rng.standard_normal((N, d))).astype(np.float32)
            index = TreeIndex(d, branching, M=M, nbits=8)
            index.train(x[: min(N, 20_000)], niter=5, pq_niter=5)
            index.add(x)
            q = (centers[rng.integers(0, 64, nq)] + 0.5 * rng.standard_normal((nq, d))).astype(np.float32)
            qd = torch.from_numpy(q).to(ctx.device)
            backend = "auto" if ctx.device.type == "cuda" else "triton"
            D, I = index.search(qd, k, beam=beam, backend=backend)
            ran_there = index._device_cache is not None and index._device_cache[0] == qd.device
            D_cpu, I_cpu = index.search(q, k, beam=beam, backend="cpu")
            check_against_cpu(row, D, I, D_cpu, I_cpu, M, ran_there)
            row.triton_ms = ctx.bench(lambda: index.search(qd, k, beam=beam, backend=backend))
            row.torch_ms = ctx.bench(lambda: index.search(q, k, beam=beam, backend="cpu"))

        ctx.case("TreeIndex.search", f"nq={nq} N={N} d={d} M={M} leaves={int(np.prod(branching))} beam={beam}"
                 f" k={k} (torch column: CPU path)", run)


class _RowEncoder:
    """Builds a torch module texts "q<i>" -> a trainable linear map of fixed query vectors."""

    def __new__(cls, base):
        import torch

        class RowEncoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("base", torch.from_numpy(base))
                self.linear = torch.nn.Linear(base.shape[1], base.shape[1], bias=False)
                torch.nn.init.eye_(self.linear.weight)

            def forward(self, texts):
                rows = torch.tensor([int(t[1:]) for t in texts], device=self.base.device)
                return self.linear(self.base[rows])

        return RowEncoder()


# (N, d, M, nbits, queries, distortion) of the synthetic JPQ task. The distortion (entries of
# A - I) leaves the untrained start well below 1 at both sizes: at d = 384 a per-entry
# 0.6 * sqrt(16 / d) started at 0.974 and training could only lose (0.974 -> 0.947 on an H200,
# 0.943 on the CPU, 2026-12-04); 1.0 * sqrt(16 / d) starts at 0.437 and the CPU trainer reaches
# 0.959 in 2 epochs.
TRAIN_SIZES = {"dry": (600, 16, 4, 4, 240, 0.6), "full": (100_000, 384, 48, 8, 4096, 1.0 * (16 / 384) ** 0.5)}


def synthetic_jpq_task(N, d, M, nbits, nq, distortion, seed: int = 5):
    """Unit-norm random documents X (N, d), a PQ index of them (M subspaces, nbits), and nq
    queries that see their one positive through a fixed distortion: Q = X[pos] A^T + noise,
    A = I + distortion * randn. Returns (X, index, query ids, qrels, Q)."""
    import numpy as np
    from jpq import PQIndex

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    pos = rng.integers(0, N, nq)
    A = np.eye(d, dtype=np.float32) + distortion * rng.standard_normal((d, d)).astype(np.float32)
    Q = (X[pos] @ A.T + 0.05 * rng.standard_normal((nq, d))).astype(np.float32)
    ids = [f"q{i}" for i in range(nq)]
    qrels = {q: {int(p): 1} for q, p in zip(ids, pos)}
    index = PQIndex(d, M, nbits=nbits, metric="ip", opq=False)
    index.train(X[: min(N, 65536)], niter=10, seed=0)
    index.add(X)
    return X, index, ids, qrels, Q


def synthetic_trainer(task, device: str, epochs: int):
    """A JPQTrainer (mode "jpq", batch 32, 20 hard negatives) of `synthetic_jpq_task`'s output,
    whose query tower is a trainable linear map of the fixed query vectors."""
    import torch
    from jpq.train import JPQTrainer, TrainConfig

    X, index, ids, qrels, Q = task
    torch.manual_seed(0)
    cfg = TrainConfig(mode="jpq", epochs=epochs, batch_size=32, negatives=20, lr_encoder=5e-3,
                      lr_centroids=5e-3, patience=epochs, refit=False, seed=0, device=device)
    return JPQTrainer(cfg, X, index, ids, qrels, query_texts={q: q for q in ids},
                      encoder=_RowEncoder(Q), progress=False)


def section_train(ctx):
    """jpq.train.JPQTrainer (mode "jpq") with device = the GPU against the same run on the CPU,
    on a synthetic task (queries see their positive through a fixed distortion): the first
    step's loss must agree, the device run must hold its tensors there and raise its own
    training nDCG@10; times are per training step (hard-negative search, fused op, AdamW), the
    "torch" column is the CPU trainer."""
    import numpy as np
    import torch

    size = TRAIN_SIZES["dry" if ctx.size == "dry" else "full"]
    N, d, M, nbits, nq, _ = size

    def run(row):
        task = synthetic_jpq_task(*size)
        dev, cpu = synthetic_trainer(task, str(ctx.device), 2), synthetic_trainer(task, "cpu", 1)
        batch = dev._batches(np.random.default_rng(0))[0]
        losses = []
        for t in (dev, cpu):
            torch.manual_seed(1)  # the corpus-reconstruction term draws its documents from it
            losses.append(t.step(batch)["loss"])
        loss_dev, loss_cpu = losses
        on_device = dev.centroids.device.type == ctx.device.type and dev.X_t.device.type == ctx.device.type
        history = synthetic_trainer(task, str(ctx.device), 2).fit()
        gain = history[-1]["val"] - history[0]["val"]
        ok = on_device and abs(loss_dev - loss_cpu) <= 1e-3 * max(1.0, abs(loss_cpu)) and gain > 0.02
        row.check = (f"{'ok' if ok else 'FAIL'} (step-1 loss {loss_dev:.4f} vs CPU {loss_cpu:.4f}, "
                     f"held-out nDCG@10 {history[0]['val']:.3f} -> {history[-1]['val']:.3f}"
                     f"{'' if on_device else ', NOT on the device'})")
        row.failed = not ok
        batches = dev._batches(np.random.default_rng(1))[:8]

        def steps(t):
            def go():
                for b in batches:
                    t.step(b)
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize()
            return go

        row.triton_ms = ctx.bench(steps(dev)) / len(batches)
        row.torch_ms = ctx.bench(steps(cpu)) / len(batches)

    ctx.case("JPQTrainer step", f"N={N} d={d} M={M} nbits={nbits} queries={nq} batch=32", run)


# --------------------------------------------------------------------------- past 32-bit offsets
def section_large(ctx, k: int = 10):
    """What no small size reaches: (1) adc_topk's span-by-span search and (score, id) merge, with
    the span shrunk to a third of N (it is 2**32 - 2 documents, which no card holds as 16-byte
    codes in a test); (2) code, score and row offsets past 2**31 elements in the ADC, top-k and
    assign kernels (int64 block offsets): N * M > 2**31 codes, n * D > 2**31 floats, checked on
    the last rows, where an int32 offset would have wrapped. (2) needs about 2.2 GB of codes and
    8.6 GB of vectors on the device; the dry run takes small sizes through the same code."""
    import numpy as np
    import torch
    from jpq.kernels import adc as adc_module
    from jpq.kernels import adc_scores, adc_topk, assign
    from jpq.kernels.adc import adc_scores_reference
    from jpq.kernels.assign import assign_reference
    from jpq.kernels.assign_triton import assign_triton

    dry = ctx.size == "dry"
    nq, N, M = (3, 301, 8) if dry else (64, 1_000_003, 16)

    def spans(row):
        lut, codes = _adc_inputs(ctx, nq, N, M, 16 if dry else 256)
        saved = adc_module.TRITON_MAX_SPAN_DOCS
        adc_module.TRITON_MAX_SPAN_DOCS = N // 3 + 1  # three spans, the last one shorter
        try:
            D, I = adc_topk(lut, codes, k, metric="ip", backend="triton")
            ref = _check_topk(row, D, I, lut, codes, k)
            del D, I, ref
            spans_ms = ctx.bench(lambda: adc_topk(lut, codes, k, backend="triton", check=False))
        finally:
            adc_module.TRITON_MAX_SPAN_DOCS = saved
        row.triton_ms = spans_ms  # against the one-span search of the same inputs
        row.torch_ms = ctx.bench(lambda: adc_topk(lut, codes, k, backend="triton", check=False))
        row.nbytes = N * M + lut.numel() * 4 + nq * k * (4 + 8)

    ctx.case("adc_topk 3 spans (torch ms: 1 span)", f"nq={nq} N={N} M={M} k={k}", spans)

    M_big = 8 if dry else 96
    N_big = 1000 if dry else (1 << 31) // M_big + 4099  # N * M > 2**31 codes (2.15 GB)

    def big_codes(row):
        lut, codes = _adc_inputs(ctx, 2, N_big, M_big, 256)
        # the last document is query 0's best possible code: its top-1 must come from past 2**31 / M
        codes[-1] = lut[0].argmax(-1).to(torch.uint8)
        qs = torch.arange(2, device=ctx.device)
        D, I = adc_topk(lut, codes, k, metric="ip", backend="triton")
        ref = _check_topk(row, D, I, lut, codes, k, qs=qs)
        del ref
        best = float(lut[0].double().max(-1).values.sum())
        if int(I[0, 0]) != N_big - 1 or abs(float(D[0, 0]) - best) > 2e-6 * M_big * float(lut.abs().max()):
            row.check, row.failed = f"FAIL top-1 {int(I[0, 0])}, not the planted {N_big - 1}", True
        top_ok = row.check
        tail = torch.arange(max(0, N_big - 4096), N_big, device=ctx.device)  # the rows past 2**31 / M
        scores = adc_scores(lut, codes, backend="triton")
        want = adc_scores_reference(lut.cpu().numpy(), codes[tail].cpu().numpy())
        got = scores[:, tail].cpu().numpy()
        atol = 2e-6 * M_big * float(lut.abs().max())
        ok = np.allclose(got, want, rtol=1e-5, atol=atol)
        row.check = f"top-k {top_ok}; last rows' scores {'ok' if ok else 'FAIL'}"
        row.failed = row.failed or not ok
        del scores, D, I
        row.triton_ms = ctx.bench(lambda: adc_topk(lut, codes, k, backend="triton", check=False))
        row.torch_ms = ctx.bench(lambda: torch_adc_topk(lut, codes, k))
        row.nbytes = N_big * M_big + lut.numel() * 4

    ctx.case("adc_topk + adc_scores, N*M > 2**31", f"nq=2 N={N_big} M={M_big} k={k}", big_codes)

    D_big, M_a = (24, 3) if dry else (96, 12)
    n_big = 500 if dry else (1 << 31) // D_big + 1001  # n * D > 2**31 floats (8.6 GB)

    def big_rows(row):
        g = _generator(ctx, 2)
        C = torch.randn((M_a, 256, D_big // M_a), generator=g, device=ctx.device)
        x = torch.randn((n_big, D_big), generator=g, device=ctx.device)
        codes = assign(x, C, backend="triton")
        rows = np.concatenate([np.arange(2048), np.arange(n_big - 2048, n_big)])
        rows = np.unique(rows[(rows >= 0) & (rows < n_big)])
        x_s, C_np = x[rows].cpu().numpy(), C.cpu().numpy()
        ties, bad = _near_tie_mismatches(x_s, C_np, codes[rows].cpu().numpy(), assign_reference(x_s, C_np))
        row.check = f"ok ({ties} near-ties)" if not bad else f"FAIL {bad} codes differ ({ties} near-ties)"
        row.failed = bad > 0
        del codes
        row.triton_ms = ctx.bench(lambda: assign_triton(x, C))
        row.torch_ms = ctx.bench(lambda: torch_assign(x, C))
        row.nbytes = x.numel() * 4 + n_big * M_a

    ctx.case("assign, n*D > 2**31", f"n={n_big} D={D_big} M={M_a} K=256", big_rows)


SECTIONS = [section_adc_scores, section_adc_topk, section_assign, section_ste, section_ste_pairs,
            section_index_search, section_ivf_search, section_tree_search, section_train, section_large]


# --------------------------------------------------------------------------- launch-config sweep
def _allowed(M, bn, bm, w) -> bool:
    """Whether adc_triton._config accepts the tiling (it refuses those an H200 computed wrong;
    bench/gpu_profile.py section 4 still tests them, launching the kernel directly)."""
    from jpq.kernels import adc_triton

    try:
        adc_triton._config(M, {"BLOCK_N": bn, "BLOCK_M": bm, "num_warps": w})
    except ValueError:
        return False
    return True


def adc_sweep(ctx, budget_s: float = 150.0) -> str:
    """Time adc_scores_triton over block sizes and warps (--sweep).

    Every configuration is checked against float64 scores of 4 queries x 4096 documents (the
    `check` column: the fraction of wrong entries and, when some are wrong, which positions
    inside a BLOCK_N block they sit at). Stops starting new configurations after budget_s
    seconds and says so.
    """
    import numpy as np
    import torch
    from jpq.kernels import adc_triton

    if ctx.size == "dry":
        N, blocks_n, blocks_m, warps = 3000, (32, 64), (1, 8, 16), (4,)
        shapes = [(1, N, 16, "low-codes"), (1, N, 16, "blocks"), (5, N, 3, "blocks")]
    else:
        N, blocks_n, blocks_m, warps = 1_000_000, (32, 64, 128, 256), (1, 8, 16, 32), (4, 8)
        shapes = [(64, N, 96, "low-codes"), (64, N, 96, "blocks"), (64, 100_003, 3, "blocks"),
                  (64, N, 16, "blocks"), (1, N, 96, "blocks"), (1024, N, 96, "default")]
    lines = ["| nq | N | M | BLOCK_N | BLOCK_M | warps | ms | vs default | check |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    t0 = time.perf_counter()
    stopped = False
    for nq, N_, M, kind in shapes:
        lut, codes = _adc_inputs(ctx, nq, N_, M, 256)
        if kind == "low-codes":  # codes < 128 only: separates a sign-extension bug from others
            codes = codes // 2
        default = adc_triton._config(M, None)
        qs = torch.arange(0, nq, max(1, nq // 4), device=ctx.device)[:4]
        docs = torch.from_numpy(np.sort(np.random.default_rng(0).choice(N_, min(N_, 4096), replace=False)))
        docs = docs.to(ctx.device)
        truth = torch_adc_scores(lut[qs].double(), codes[docs])  # (len(qs), len(docs)) float64
        atol = 2e-6 * M * float(lut.abs().max())
        t_default = ctx.bench(lambda: adc_triton.adc_scores_triton(lut, codes))
        if kind == "blocks":
            configs = [{"BLOCK_N": bn, "BLOCK_M": bm, "num_warps": w}
                       for bn in blocks_n for bm in sorted({*blocks_m, default["BLOCK_M"]})
                       for w in warps if bm <= default["BLOCK_M"] and _allowed(M, bn, bm, w)]
        else:  # "low-codes", "default": the default configuration only
            configs = [{}]
        for cfg in configs:
            if time.perf_counter() - t0 > budget_s:
                stopped = True
                break
            full = {**default, **cfg}
            try:
                got = adc_triton.adc_scores_triton(lut, codes, config=cfg)[qs][:, docs].double()
                wrong = (got - truth).abs() > atol
                if bool(wrong.any()):
                    pos = torch.unique((docs[None, :].expand_as(wrong)[wrong]) % full["BLOCK_N"])
                    check = (f"FAIL {float(wrong.float().mean()):.3f} wrong, at positions "
                             f"{pos[:6].tolist()}{'...' if len(pos) > 6 else ''} of {len(pos)}")
                else:
                    check = "ok"
                ms = ctx.bench(lambda cfg=cfg: adc_triton.adc_scores_triton(lut, codes, config=cfg))
                vs = f"{t_default / ms:.2f}x"
            except Exception as exc:  # e.g. out of registers / shared memory for a big tile
                check, ms, vs = f"ERROR {type(exc).__name__}", None, "—"
            if kind == "low-codes":
                check += " (codes < 128)"
            lines.append(f"| {nq} | {N_} | {M} | {full['BLOCK_N']} | {full['BLOCK_M']} | {full['num_warps']} "
                         f"| {_fmt_ms(ms)} | {vs} | {check} |")
            print(lines[-1], flush=True)
        del lut, codes
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        if stopped:
            break
    note = "" if not stopped else f"\n(sweep stopped after {budget_s:.0f} s: later configurations not run)\n"
    if any("ERROR" in line for line in lines):
        note += ("\n(after a CUDA error such as an illegal address every later configuration fails too: "
                 "CUDA errors are sticky; rerun from the first ERROR with fewer configurations)\n")
    return ("ADC launch-configuration sweep (adc_scores_triton; 'vs default' = default config's "
            "time / this config's time, >1 is faster than the default):\n\n" + "\n".join(lines) + "\n" + note)


# --------------------------------------------------------------------------- main
def start_torch(cpu_dry_run: bool, nothing: str):
    """Set TRITON_INTERPRET for a dry run (or clear it), then import torch; returns it, or None
    after printing "no CUDA device: <nothing>" when there is no GPU and no dry run. Triton reads
    TRITON_INTERPRET when it is imported: call this before anything imports it."""
    if cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch

    if not cpu_dry_run and not torch.cuda.is_available():
        print(f"no CUDA device: {nothing}")
        return None
    return torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 100,000 instead of 1,000,000")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes under the CPU interpreter")
    parser.add_argument("--sections", default="", help="comma-separated substrings of section names")
    parser.add_argument("--no-save", action="store_true", help=f"do not append to {RESULTS}")
    parser.add_argument("--sweep", action="store_true", help="also time ADC launch configurations")
    parser.add_argument("--sweep-budget", type=float, default=150.0, help="seconds for the sweep")
    args = parser.parse_args(argv)

    torch = start_torch(args.cpu_dry_run, "nothing to check")
    if torch is None:
        return 0
    import triton

    import jpq

    if args.cpu_dry_run:
        device, name = torch.device("cpu"), f"CPU interpreter ({platform.processor() or platform.machine()})"
    else:
        device, name = torch.device("cuda"), torch.cuda.get_device_name()
    size = "dry" if args.cpu_dry_run else "quick" if args.quick else "full"
    ctx = Context(device=device, size=size, peak=None if args.cpu_dry_run else hbm_peak(name))

    wanted = [s for s in args.sections.split(",") if s]
    for section in SECTIONS:
        if wanted and not any(w in section.__name__ for w in wanted):
            continue
        section(ctx)

    timer = "3 perf_counter runs (interpreter: timings mean nothing)" if args.cpu_dry_run else "triton.testing.do_bench"
    peak = f"HBM peak {ctx.peak / 1e12:.2f} TB/s" if ctx.peak else "HBM peak unknown"
    header = (
        f"## {datetime.datetime.now().isoformat(timespec='seconds')}: {name} ({peak}), sizes={size}\n\n"
        f"torch {torch.__version__}, triton {triton.__version__}, jpq {jpq.__version__}, "
        f"CUDA {torch.version.cuda}; medians of {timer}; GB/s = compulsory bytes "
        f"(codes + LUT + output, or x + centroids + codes) / triton time."
    )
    table = markdown_table(ctx, header)
    if args.sweep:
        table += "\n" + adc_sweep(ctx, args.sweep_budget)
    print()
    print(table)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(table + "\n")
        print(f"appended to {RESULTS}")
    return 1 if any(r.failed for r in ctx.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
