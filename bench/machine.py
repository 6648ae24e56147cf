"""Machine description and timing helpers shared by the benchmark scripts."""
from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# ../shared/data beside the project folder: the default --data / --embeddings of the bench scripts
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCIFACT = SHARED_DATA / "scifact"
SCIFACT_MINILM = SHARED_DATA / "scifact-minilm" / "embeddings.npz"


def command_line(script: str, argv: list[str] | None) -> str:
    """How a bench script was invoked, for its report: `python bench/<script> <args>`
    (argv: the arguments given to main, or None for the process's own)."""
    return " ".join([f"python bench/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_threads(n: int) -> None:
    """Same thread count for every library in the comparison."""
    import faiss
    import numba
    import torch

    faiss.omp_set_num_threads(n)
    numba.set_num_threads(n)
    torch.set_num_threads(n)


def machine_info(threads: int) -> dict:
    import jpq
    import torch

    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = "-"
    return {
        "cpu": cpu_model(),
        "threads": threads,
        "jpq": jpq.__version__,
        "torch": torch.__version__,
        "faiss": faiss_version,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Median seconds per function, runs interleaved (a, b, a, b, ...) so drift hits both."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not available")


def append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        if new:
            w.writeheader()
        w.writerows(rows)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
