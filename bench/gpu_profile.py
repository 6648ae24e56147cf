"""Where the GPU time goes: a breakdown of the paths bench/gpu.py found slow.

    python bench/gpu_profile.py                 # on a CUDA machine (about 2 minutes on an H200)
    python bench/gpu_profile.py --cpu-dry-run   # tiny sizes under TRITON_INTERPRET=1: tests this script

Sections (each writes a markdown block; all are printed and put at the top of
bench/results/gpu_profile.md, above the earlier runs):
  1. adc_topk's Triton path split into its stages (the block top-k kernel, torch.topk of the
     kept keys), and the path it replaced (scores kernel, int64 keys of all scores, torch.topk of
     them), with a float torch.topk of the same scores for scale;
  2. one JPQTrainer step on the synthetic task of bench/gpu.py (section_train), timed per phase
     (query tower, hard-negative search, candidate lists, fused op forward, backward, AdamW) with a
     device synchronisation around each, then the torch.profiler table of 8 steps;
  3. the fused straight-through op, forward + backward at (64 queries x 100,000 documents,
     M = 96): torch.profiler table of its kernels;
  4. which ADC tilings are right: adc_scores_triton at launch configurations around the ones the
     --sweep of 2026-12-04 found wrong (256 documents x >1 subspaces with 4 warps), each checked
     against float64 scores.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_profile.md"


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def topk_breakdown(ctx) -> str:
    """adc_topk's Triton path (block top-k kernel, then torch.topk of the kept keys) by stage,
    and the path it replaced (scores kernel, int64 keys of every score, torch.topk of all)."""
    import torch
    from gpu import _adc_inputs
    from jpq.kernels import adc_topk
    from jpq.kernels.adc import order_keys
    from jpq.kernels.adc_triton import adc_block_topk_keys, adc_scores_triton

    k = 10
    sizes = [(1, 300, 8), (5, 301, 8)] if ctx.size == "dry" else \
        [(1, 1_000_000, 96), (5, 100_000, 96), (32, 100_000, 48), (64, 1_000_000, 96), (1024, 1_000_000, 96)]
    lines = ["| nq | N | M | adc_topk | block top-k kernel | topk(kept keys) | old: scores kernel | "
             "old: order_keys | old: topk(all keys) | old total | float topk(scores) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for nq, N, M in sizes:
        lut, codes = _adc_inputs(ctx, nq, N, M, 256)
        kept = adc_block_topk_keys(lut, codes, k, True)
        scores = adc_scores_triton(lut, codes)
        ids = torch.arange(N, device=ctx.device).expand_as(scores)
        keys = order_keys(scores, ids, True)
        t = [ctx.bench(lambda: adc_topk(lut, codes, k, backend="triton", check=False)),
             ctx.bench(lambda: adc_block_topk_keys(lut, codes, k, True)),
             ctx.bench(lambda: torch.topk(kept, k, dim=1, sorted=False)),
             ctx.bench(lambda: adc_scores_triton(lut, codes)),
             ctx.bench(lambda: order_keys(scores, ids, True)),
             ctx.bench(lambda: torch.topk(keys, k, dim=1, sorted=False))]
        t.append(sum(t[3:6]))
        t.append(ctx.bench(lambda: torch.topk(scores, k, dim=1)))
        lines.append(f"| {nq} | {N} | {M} | " + " | ".join(f"{v:.3f}" for v in t) + " |")
        print(lines[-1], flush=True)
        del lut, codes, scores, ids, keys, kept
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return ("### 1. adc_topk (Triton path) by stage, k = 10 (ms, medians)\n\n"
            "'old' = the path before the block top-k kernel (2026-12-04 morning): every score "
            "written, turned into an int64 key and ranked by one torch.topk.\n\n" + "\n".join(lines) + "\n")


def _mean_step_ms(trainer, batches, device) -> float:
    """Mean wall milliseconds of trainer.step over batches, the device drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    for b in batches:
        trainer.step(b)
    _sync(device)
    return (time.perf_counter() - t0) / len(batches) * 1e3


class _PhaseTimer:
    """Wraps trainer methods so each call is timed between two device synchronisations."""

    def __init__(self, device):
        self.device = device
        self.total: dict[str, float] = {}

    def wrap(self, obj, name, label):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            _sync(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            _sync(self.device)
            self.total[label] = self.total.get(label, 0.0) + time.perf_counter() - t0
            return out

        setattr(obj, name, timed)


def _profile_table(prof, device, rows: int = 20) -> str:
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def train_step_profile(ctx) -> str:
    import numpy as np
    import torch
    from gpu import TRAIN_SIZES, synthetic_jpq_task, synthetic_trainer

    size = TRAIN_SIZES["dry" if ctx.size == "dry" else "full"]
    task = synthetic_jpq_task(*size)
    trainer = synthetic_trainer(task, str(ctx.device), 1)
    batches = trainer._batches(np.random.default_rng(1))
    warm, timed = batches[:3], batches[3:19]
    for b in warm:
        trainer.step(b)
    per_step = _mean_step_ms(trainer, timed, ctx.device)

    phases = _PhaseTimer(ctx.device)
    phases.wrap(trainer, "_queries", "query tower forward")
    phases.wrap(trainer, "search", "hard-negative search (incl. copy to host)")
    phases.wrap(trainer, "_candidates", "candidate lists (incl. the search)")
    phases.wrap(trainer, "_scores", "fused op forward (+ unique, copies)")
    phases.wrap(trainer, "_corpus_recon", "corpus reconstruction term")
    phases.wrap(trainer.optimizer, "step", "AdamW step")
    backward = torch.Tensor.backward

    def timed_backward(self, *a, **kw):
        _sync(ctx.device)
        t = time.perf_counter()
        backward(self, *a, **kw)
        _sync(ctx.device)
        phases.total["backward"] = phases.total.get("backward", 0.0) + time.perf_counter() - t

    torch.Tensor.backward = timed_backward
    try:
        synced = _mean_step_ms(trainer, timed, ctx.device)
    finally:
        torch.Tensor.backward = backward
    lines = ["| phase | ms per step (synchronised) |", "|---|---:|"]
    for label, total in phases.total.items():
        lines.append(f"| {label} | {total / len(timed) * 1e3:.3f} |")
    lines.append(f"| whole step, phases synchronised | {synced:.3f} |")
    lines.append(f"| whole step, as the trainer runs it | {per_step:.3f} |")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if ctx.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    trainer2 = synthetic_trainer(task, str(ctx.device), 1)
    for b in warm:
        trainer2.step(b)
    with torch.profiler.profile(activities=activities) as prof:
        for b in timed[:8]:
            trainer2.step(b)
        _sync(ctx.device)
    N, d, M, nbits, nq, _ = size
    return (f"### 2. One JPQTrainer step, N={N} d={d} M={M} nbits={nbits} batch=32, 20 negatives\n\n"
            f"Mean of {len(timed)} steps after {len(warm)} warm-up steps.\n\n" + "\n".join(lines) +
            "\n\ntorch.profiler, 8 steps:\n\n```\n" + _profile_table(prof, ctx.device, 25) + "\n```\n")


def ste_profile(ctx) -> str:
    import torch
    from jpq.kernels.ste import quantize_and_score

    nq, n, D, M, K = (3, 50, 24, 3, 16) if ctx.size == "dry" else (64, 100_000, 768, 96, 256)
    g = torch.Generator(device=ctx.device).manual_seed(2)
    q = torch.randn((nq, D), generator=g, device=ctx.device).requires_grad_()
    C = torch.randn((M, K, D // M), generator=g, device=ctx.device).requires_grad_()
    codes = torch.randint(0, K, (n, M), generator=g, device=ctx.device, dtype=torch.uint8)
    grad_s = torch.randn((nq, n), generator=g, device=ctx.device)

    def step():
        quantize_and_score(q, C, codes=codes, backend="triton").backward(grad_s)
        q.grad = C.grad = None

    for _ in range(3):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if ctx.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            step()
        _sync(ctx.device)
    return (f"### 3. Fused straight-through op, forward + backward, nq={nq} n={n} D={D} M={M} K={K}\n\n"
            "torch.profiler, 5 calls:\n\n```\n" + _profile_table(prof, ctx.device, 15) + "\n```\n")


def tiling_check(ctx) -> str:
    import numpy as np
    import torch
    from gpu import _adc_inputs, torch_adc_scores
    import triton
    from jpq.kernels.adc_triton import _adc_gather_kernel

    nq, N, M = (2, 700, 8) if ctx.size == "dry" else (4, 100_003, 96)
    lut, codes = _adc_inputs(ctx, nq, N, M, 256)
    truth = torch_adc_scores(lut.double(), codes)
    atol = 2e-6 * M * float(lut.abs().max())
    configs = [(128, 32, 4), (128, 32, 2), (128, 8, 2), (128, 1, 2), (64, 32, 1), (64, 32, 2),
               (256, 32, 4), (256, 1, 4), (256, 2, 4), (256, 32, 8), (256, 32, 16), (512, 32, 8),
               (512, 1, 8), (512, 32, 16)]
    if ctx.size == "dry":
        configs = [(64, 8, 4), (128, 1, 2)]
    lines = ["| BLOCK_N | BLOCK_M | warps | rows per thread (BLOCK_N / (32 warps)) | check |",
             "|---:|---:|---:|---:|---|"]
    for bn, bm, w in configs:
        try:
            # the kernel itself: adc_triton._config refuses the tilings found wrong, this tests them
            got = torch.empty((nq, N), dtype=torch.float32, device=ctx.device)
            _adc_gather_kernel[(triton.cdiv(N, bn), nq)](lut, codes, codes, got, nq, N, M, 256, PAIRS=False,
                                                          BLOCK_N=bn, BLOCK_M=bm, num_warps=w)
            got = got.double()
            wrong = float(((got - truth).abs() > atol).float().mean())
            check = "ok" if wrong == 0 else f"FAIL {wrong:.3f} wrong"
        except Exception as exc:
            check = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}"
        lines.append(f"| {bn} | {bm} | {w} | {bn / (32 * w):g} | {check} |")
        print(lines[-1], flush=True)
    return (f"### 4. adc_scores_triton tilings against float64 (nq={nq}, N={N}, M={M}, K=256)\n\n"
            + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes under the CPU interpreter")
    parser.add_argument("--sections", default="topk,train,ste,tiling")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    from gpu import Context, start_torch

    torch = start_torch(args.cpu_dry_run, "nothing to profile")
    if torch is None:
        return 0
    import triton

    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    name = "CPU interpreter" if args.cpu_dry_run else torch.cuda.get_device_name()
    ctx = Context(device=device, size="dry" if args.cpu_dry_run else "full", peak=None)
    blocks = [f"## {datetime.datetime.now().isoformat(timespec='seconds')}: {name}\n\n"
              f"torch {torch.__version__}, triton {triton.__version__}; `python bench/gpu_profile.py`; "
              f"times are medians of triton.testing.do_bench unless said otherwise.\n"]
    sections = {"topk": topk_breakdown, "train": train_step_profile, "ste": ste_profile, "tiling": tiling_check}
    for key in args.sections.split(","):
        print(f"[{key}] ...", flush=True)
        t0 = time.perf_counter()
        try:
            blocks.append(sections[key](ctx))
        except Exception as exc:  # keep going: the other sections still say something
            import traceback

            traceback.print_exc()
            blocks.append(f"### {key}: ERROR {type(exc).__name__}: {exc}\n")
        print(blocks[-1], flush=True)
        print(f"[{key}] {time.perf_counter() - t0:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = "\n".join(blocks)
    if not args.no_save:  # newest run first, after the title and its one-line intro
        head = "# GPU profile (bench/gpu_profile.py)\n\n"
        intro = ("Newest run first; each says which kernel code it ran. "
                 "`python bench/gpu_profile.py` prepends a new run.\n\n")
        earlier = RESULTS.read_text() if RESULTS.exists() else ""
        earlier = earlier[len(head):] if earlier.startswith(head) else earlier
        earlier = earlier[len(intro):] if earlier.startswith(intro) else earlier
        RESULTS.write_text(head + intro + text + "\n" + earlier)
        print(f"added to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
