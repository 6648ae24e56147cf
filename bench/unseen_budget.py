"""How much of the issue's 96x target the documents no training query points to leave reachable:
from the per-subset test tables that `bench/demo_unseen.py` wrote for finished demos, per split,
the nDCG@10 that JPQ full would need on the test queries with unseen positives to reach a target
share (97%) of uncompressed-trained at a ratio, given its score on the other test queries, next
to what it and post-hoc OPQ score there and what those queries lose to compression zero-shot.

    python bench/unseen_budget.py [--ratio 96] [--target 0.97] [DEMO_DIR ...]

Reads only committed result files (default: bench/results/demo_scifact and demo_scifact_seed1..4);
trains and selects nothing: it explains a test figure, it chooses no setting.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DEMOS = ["demo_scifact"] + [f"demo_scifact_seed{s}" for s in range(1, 5)]
RATIOS = (16, 32, 64, 96)


def read_subsets(path: Path) -> tuple[dict, dict, int, int]:
    """(unseen, seen, n_unseen, n_total) from an unseen.md: {method: {ratio: nDCG@10}} per subset."""
    text = path.read_text()
    counts = re.search(r"(\d+) of (\d+) test queries", text)
    if counts is None:
        raise ValueError(f"{path}: no 'N of M test queries' line")
    tables, current = [], None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| method"):
            current = {}
            tables.append(current)
        elif line.startswith("|") and current is not None and not line.startswith("|---"):
            current[cells[0]] = {r: float(c.split("/")[0]) for r, c in zip(RATIOS, cells[1:])}
    if len(tables) != 2:
        raise ValueError(f"{path}: expected two tables (unseen, seen), found {len(tables)}")
    return tables[0], tables[1], int(counts.group(1)), int(counts.group(2))


def budget(demo: Path, ratio: int, target: float) -> dict:
    unseen, seen, n_u, n = read_subsets(demo / "unseen.md")
    n_s = n - n_u
    whole = lambda method, r: (n_u * unseen[method][r] + n_s * seen[method][r]) / n  # noqa: E731
    ut, jpq = whole("uncompressed-trained", ratio), whole("jpq", ratio)
    rows = {r["method"]: r for r in json.loads((demo / "results.json").read_text()) if r["ratio"] in (1, ratio)}
    for method, value in (("uncompressed-trained", ut), ("jpq", jpq)):  # the split tables add up to the demo's rows
        if abs(rows[method]["ndcg@10"] - value) > 1e-3:
            raise ValueError(f"{demo}: {method} subsets give {value:.4f}, results.json {rows[method]['ndcg@10']:.4f}")
    needed = (target * ut * n - n_s * seen["jpq"][ratio]) / n_u
    return {"demo": demo.name, "n_unseen": n_u, "n": n, "ut": ut, "jpq": jpq, "share": jpq / ut,
            "jpq_seen": seen["jpq"][ratio], "ut_seen": seen["uncompressed-trained"][ratio],
            "jpq_unseen": unseen["jpq"][ratio], "ut_unseen": unseen["uncompressed-trained"][ratio],
            "opq_unseen": unseen["opq"][ratio], "zero_shot_unseen": unseen["uncompressed"][ratio],
            "needed_unseen": needed}


def report(rows: list[dict], ratio: int, target: float) -> str:
    pct = f"{target:.0%}"
    lines = [f"# What the {ratio}x target leaves to test queries with unseen positives (nDCG@10, test split)", "",
             f"Per demo split: JPQ full's share of uncompressed-trained, its score on the test queries none of whose "
             f"relevant documents is a training positive ('unseen') and on the rest ('seen'), and the unseen score it "
             f"would need for {pct} given its seen score. Post-hoc OPQ and the uncompressed zero-shot vectors on the "
             f"unseen queries show what {ratio}x compression costs there before any training. From committed files "
             "only: nothing is trained or chosen.", "",
             "| split | share | seen: JPQ / UT | unseen: JPQ / UT | unseen needed | unseen: zero-shot / OPQ | "
             "OPQ's zero-shot loss | loss allowed vs zero-shot | unseen gain over OPQ: JPQ / needed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['demo']} ({r['n_unseen']} of {r['n']}) | {r['share']:.1%} | {r['jpq_seen']:.3f} / "
                     f"{r['ut_seen']:.3f} | {r['jpq_unseen']:.3f} / {r['ut_unseen']:.3f} | {r['needed_unseen']:.3f} | "
                     f"{r['zero_shot_unseen']:.3f} / {r['opq_unseen']:.3f} | "
                     f"{r['zero_shot_unseen'] - r['opq_unseen']:+.3f} | "
                     f"{r['zero_shot_unseen'] - r['needed_unseen']:+.3f} | "
                     f"{r['jpq_unseen'] - r['opq_unseen']:+.3f} / {r['needed_unseen'] - r['opq_unseen']:+.3f} |")
    lines += ["", f"Command: `python bench/unseen_budget.py --ratio {ratio} --target {target}`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demos", nargs="*", help="finished demo folders with unseen.md (default: the committed SciFact ones)")
    ap.add_argument("--ratio", type=int, default=96, choices=RATIOS)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = ap.parse_args(argv)
    demos = [Path(d) for d in args.demos] or [RESULTS / d for d in DEFAULT_DEMOS]
    text = report([budget(d, args.ratio, args.target) for d in demos], args.ratio, args.target)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
