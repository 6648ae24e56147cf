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
import sys
from pathlib import Path

from jpq.data import load_beir
from jpq.storage import atomic_write


def write_qrels(path: Path, qrels: dict[str, dict[str, int]]) -> None:
    """A BEIR qrels TSV, written atomically."""
    text = "query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{score}\n" for q, rel in qrels.items() for d, score in rel.items())
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def derive(data: Path, out: Path, test_split: str = "test", train_split: str = "train") -> dict:
    """Write the derived folder to `out` (qrels read and checked by `jpq.data.load_beir`); returns
    the query counts."""
    ds = load_beir(data, splits=[train_split, test_split])
    # the judgments as the files hold them (of known queries), those of documents missing from the corpus too
    train, test = ds.evaluation_qrels(train_split), ds.evaluation_qrels(test_split)
    test_positives = {d for rel in test.values() for d, score in rel.items() if score > 0}
    kept = {q: rel for q, rel in train.items()
            if not any(score > 0 and d in test_positives for d, score in rel.items())}
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
    return {"train_queries": len(train), "kept_train_queries": len(kept),
            "dropped_train_queries": len(train) - len(kept), "test_queries": len(test)}


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
