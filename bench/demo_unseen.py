"""After `jpq demo`: the test table again, on the test queries none of whose relevant documents is
a training positive (documents no training query points to: what training cannot memorise), and
on the other test queries (the two tables split the demo's figures by query).

    python bench/demo_unseen.py --demo DIR [--data ../shared/data/scifact] [--out FILE.md]

Reads the demo's saved models (DIR/checkpoints: the trained indexes `jpq-*.jpq`,
`jpq-centroids-*.jpq` and the refit query towers), rebuilds the post-hoc PQ / OPQ indexes with the
demo's seed, and evaluates every method on both subsets. Nothing is trained or selected here.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import SCIFACT  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="the --out folder of a finished `jpq demo`")
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--out", default=None, help="markdown file (default: DEMO/unseen.md)")
    ap.add_argument("--seed", type=int, default=None,
                    help="the demo's seed, for its PQ / OPQ rows (default: DEMO/settings.json's, else 0)")
    args = ap.parse_args(argv)
    if args.seed is None:
        settings = Path(args.demo) / "settings.json"
        args.seed = int(json.loads(settings.read_text())["config"]["seed"]) if settings.exists() else 0

    from jpq.index import PQIndex
    from jpq.metrics import mean_over_queries, per_query
    from jpq.pipeline import EVAL_METRICS, build_index, load_workspace, m_for_ratio

    demo = Path(args.demo)
    ck = demo / "checkpoints"
    records = json.loads((demo / "results.json").read_text())
    ws = load_workspace(args.data, progress=False)
    ds = ws.dataset
    qrels = ds.evaluation_qrels(ws.test_split)
    train_pos = {d for rel in ds.qrels[ws.train_split].values() for d, r in rel.items() if r > 0}
    test_ids = ws.test_ids()
    unseen = [q for q in test_ids if not any(r > 0 and d in train_pos for d, r in qrels.get(q, {}).items())]
    if not unseen:
        sys.exit("every test query has a training positive among its relevant documents")
    unseen_set = set(unseen)
    seen = [q for q in test_ids if q not in unseen_set]
    texts = [ds.query_texts[i] for i in ws.query_rows(test_ids)]
    q0 = ws.query_emb[ws.query_rows(test_ids)]

    def tower(name):
        path = ck / name / "refit" / "best.pt"
        path = path if path.exists() else ck / name / "best.pt"
        enc = copy.deepcopy(ws.encoder)
        enc.load_state_dict(torch.load(path, weights_only=False)["model"]["encoder"])
        return enc.encode(texts)

    def exact(q):
        return torch.topk(torch.from_numpy(q) @ torch.from_numpy(ws.doc_emb).T, 100).indices.numpy()

    results = {("uncompressed", 1): exact(q0), ("uncompressed-trained", 1): exact(tower("uncompressed-trained"))}
    ratios = sorted({r["ratio"] for r in records if r["ratio"] != 1})
    for ratio in ratios:
        M = m_for_ratio(ws.d, ratio)
        results[("pq", ratio)] = build_index(ws.doc_emb, M, opq=False, seed=args.seed).search(q0, 100)[1]
        results[("opq", ratio)] = build_index(ws.doc_emb, M, opq=True, seed=args.seed).search(q0, 100)[1]
        results[("jpq-centroids", ratio)] = PQIndex.load(ck / f"jpq-centroids-{ratio}.jpq").search(q0, 100)[1]
        results[("jpq", ratio)] = PQIndex.load(ck / f"jpq-{ratio}.jpq").search(tower(f"jpq-{ratio}"), 100)[1]
    per_q = {key: per_query((I, test_ids, ds.corpus_ids), qrels, EVAL_METRICS) for key, I in results.items()}

    def table(ids):
        ev = {key: mean_over_queries(pq, ids) for key, pq in per_q.items()}
        out = ["| method | " + " | ".join(f"{r}x" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for m in ("uncompressed", "uncompressed-trained", "pq", "opq", "jpq-centroids", "jpq"):
            cells = [ev.get((m, r)) or ev.get((m, 1)) for r in ratios]
            out.append(f"| {m} | " + " | ".join(f"{c['ndcg@10']:.4f} / {c['recall@100']:.4f}" for c in cells) + " |")
        return out

    lines = [f"# {ds.name}: test queries whose relevant documents no training query points to",
             "", f"{len(unseen)} of {len(test_ids)} test queries; nDCG@10 / Recall@100. "
             f"Models from `{demo}` (`python bench/demo_unseen.py --demo {demo}`).", "", *table(unseen), "",
             f"The other {len(seen)} test queries (at least one relevant document is a training positive):", "",
             *table(seen)]
    out = Path(args.out) if args.out else demo / "unseen.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
