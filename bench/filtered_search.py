"""faiss IDSelectors in jpq: how long reading one takes, and filtered vs unfiltered search.

    python bench/filtered_search.py            # 1M ids for the selectors, N = 200k codes, ~1 min
    python bench/filtered_search.py --quick    # small sizes: a smoke test

1. Selector reading (what `PQIndex.remove_ids` and a filtered search do first): the mask over
   1M distinct ids, by `PQIndex._selected` (Range / Array / Bitmap read as arrays, others by
   faiss' own loop) against asking `is_member` once per id from Python (the plain approach;
   for IDSelectorArray faiss scans its list per call, so that column uses 100k ids and is
   scaled by 10). Both give the same mask (checked).
2. `PQIndex.search(q, k, params=faiss.SearchParameters(sel=...))` (16 queries, k = 10, random
   PQ codes, D = 768, M = 96) against the unfiltered search, medians of interleaved repeats.
Writes bench/results/filtered_search.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, command_line, default_threads, interleaved_medians, machine_info, set_threads  # noqa: E402


def once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    import faiss

    import jpq
    from range_search import random_index

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "filtered_search.md"))
    args = ap.parse_args(argv)
    set_threads(args.threads)
    info = machine_info(args.threads)
    n_ids, N = (100_000, 20_000) if args.quick else (1_000_000, 200_000)
    lines = ["# faiss IDSelectors in jpq", "",
             f"{info['cpu']}, {args.threads} threads, faiss {info['faiss']}, {info['date']}. "
             f"Command: `{command_line('bench/filtered_search.py', argv)}`.", "",
             f"## Reading a selector over {n_ids} distinct ids", "",
             "| selector | jpq (`PQIndex._selected`) | is_member per id from Python | same mask |",
             "|---|---|---|---|"]
    keys = np.arange(n_ids, dtype=np.int64)
    bitmap = np.packbits((keys % 5 == 0).astype(np.uint8), bitorder="little")
    selectors = [("IDSelectorRange (10%)", faiss.IDSelectorRange(0, n_ids // 10)),
                 ("IDSelectorArray (1/7)", faiss.IDSelectorArray(keys[::7].copy())),
                 ("IDSelectorBitmap (1/5)", faiss.IDSelectorBitmap(bitmap)),
                 ("IDSelectorBatch (1/3)", faiss.IDSelectorBatch(keys[::3].copy())),
                 ("IDSelectorNot(Range) (50%)", faiss.IDSelectorNot(faiss.IDSelectorRange(0, n_ids // 2)))]
    for name, sel in selectors:
        ours = statistics.median(once(lambda: jpq.PQIndex._selected(sel, keys)) for _ in range(5))
        # per-id from Python: an Array is a linear scan per call in faiss, so ask a tenth and scale
        sub = keys[: n_ids // 10] if "Array" in name else keys
        t = time.perf_counter()
        plain = np.fromiter((sel.is_member(int(k)) for k in sub), dtype=bool, count=len(sub))
        per_id = (time.perf_counter() - t) * (len(keys) / len(sub))
        same = np.array_equal(jpq.PQIndex._selected(sel, sub), plain)
        lines.append(f"| {name} | {ours * 1e3:.1f} ms | {per_id * 1e3:.0f} ms"
                     f"{' (from 1/10 of the ids)' if len(sub) < len(keys) else ''} | {'yes' if same else 'NO'} |")
        print(lines[-1], flush=True)

    index = random_index(N, 768, 96)
    q = np.random.default_rng(1).standard_normal((16, 768)).astype(np.float32)
    batch = np.random.default_rng(2).choice(N, N // 10, replace=False)
    cases = {"unfiltered": None,
             "Range, 10% selected": faiss.IDSelectorRange(0, N // 10),
             "Array, 10% selected": faiss.IDSelectorArray(batch),
             "Batch, 10% selected": faiss.IDSelectorBatch(batch),
             "Range, 90% selected": faiss.IDSelectorRange(0, N * 9 // 10)}
    fns = {name: (lambda p=(None if sel is None else faiss.SearchParameters(sel=sel)): index.search(q, 10, params=p))
           for name, sel in cases.items()}
    t = interleaved_medians(fns, repeats=args.repeats)
    lines += ["", f"## PQIndex.search with a selector: N = {N}, D = 768, M = 96, 16 queries, k = 10", "",
              f"Medians of {args.repeats} interleaved repeats.", "",
              "| search | time | vs unfiltered |", "|---|---|---|"]
    for name in fns:
        lines.append(f"| {name} | {t[name] * 1e3:.1f} ms | {t[name] / t['unfiltered']:.2f}x |")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
