"""Derive a BEIR folder whose test positives no training query points to.

The issue behind `jpq demo` warns of datasets whose test positives are mostly documents that no
training query points to: there, training that moves the shared centroids towards the training
positives can end below the post-hoc index. This script makes such a dataset from any BEIR folder:
the corpus, the queries and the test qrels stay as they are, and the train qrels lose every query
one of whose positives is also a test positive. Every test query then has only "unseen" positives.

    python bench/unseen_split.py --data ../shared/data/scifact --out /tmp/scifact-unseen
    jpq demo --data /tmp/scifact-unseen --embeddings ../shared/data/scifact-minilm/embeddings.npz \
        --out /tmp/demo-scifact-unseen

The corpus and queries files are linked, not copied (same ids, so precomputed embeddings of the
source folder apply unchanged).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def read_qrels(path: Path) -> list[tuple[str, str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        if not header.lower().startswith("query-id"):
            raise ValueError(f"{path}: expected a 'query-id<TAB>corpus-id<TAB>score' header, got {header!r}")
        for line in f:
            cols = line.rstrip("\r\n").split("\t")
            if len(cols) == 3:
                rows.append((cols[0], cols[1], cols[2]))
    return rows


def write_qrels(path: Path, rows) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows),
                   encoding="utf-8")
    os.replace(tmp, path)


def derive(data: Path, out: Path, test_split: str = "test", train_split: str = "train") -> dict:
    train = read_qrels(data / "qrels" / f"{train_split}.tsv")
    test = read_qrels(data / "qrels" / f"{test_split}.tsv")
    test_positives = {d for _, d, s in test if int(s) > 0}
    dropped = {q for q, d, s in train if int(s) > 0 and d in test_positives}
    kept = [r for r in train if r[0] not in dropped]
    if not kept:
        raise ValueError(f"every {train_split} query shares a positive with {test_split}: nothing to train on")
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((data / name).resolve())
    write_qrels(out / "qrels" / f"{train_split}.tsv", kept)
    write_qrels(out / "qrels" / f"{test_split}.tsv", test)
    return {"train_queries": len({q for q, _, _ in train}), "kept_train_queries": len({q for q, _, _ in kept}),
            "dropped_train_queries": len(dropped), "test_queries": len({q for q, _, _ in test})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="source BEIR folder")
    ap.add_argument("--out", required=True, type=Path, help="folder to write the derived dataset to")
    args = ap.parse_args(argv)
    if args.out.resolve() == args.data.resolve():
        raise SystemExit("--out must differ from --data")
    counts = derive(args.data, args.out)
    print(f"{args.out}: kept {counts['kept_train_queries']} of {counts['train_queries']} training queries "
          f"(dropped {counts['dropped_train_queries']} sharing a positive with the "
          f"{counts['test_queries']} test queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
