"""Anisotropic initial codebooks or plain OPQ: the comparison behind `TrainConfig.anisotropic_eta`.

    python bench/anisotropic_init.py           # post-hoc indexes only, ~2 min
    python bench/anisotropic_init.py --train   # + JPQ selection runs at 32x and 96x, ~15 min

Post-hoc part (no training, no labels used to build anything): for each ratio, the OPQ index the
demo builds and `jpq.index.anisotropic_codebooks` of it at several eta, scored with the zero-shot
query vectors of *all* train-split queries (the test split is never read): nDCG@10, Recall@100,
the plain squared reconstruction error and the parallel part of it.

--train: two `JPQTrainer`s (mode jpq, centroid rate 1e-3 as the demo selects at these ratios) per
ratio on the trainer's own held-out fifth of the train split (--seed), identical but for
`anisotropic_eta` (1 = plain OPQ start, the default, and --train-eta): held-out nDCG@10 at epoch 0 and at the
selected epoch (no refit). Writes bench/results/anisotropic_init.md.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, command_line, cpu_model  # noqa: E402


def error_parts(index, x):
    """(mean squared error, mean squared error along each vector) in the index's rotated space."""
    y = index.rotate(x)
    r = y - index.centroids[np.arange(index.M)[None, :], index.codes].reshape(len(y), -1)
    par = (r * y).sum(1) / np.maximum(np.linalg.norm(y, axis=1), 1e-30)
    return float((r ** 2).sum(1).mean()), float((par ** 2).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--ratios", default="16,32,64,96")
    ap.add_argument("--etas", default="2,4,8")
    ap.add_argument("--train", action="store_true", help="also the JPQ selection runs at 32x and 96x")
    ap.add_argument("--train-eta", type=float, default=4.0, help="eta of the anisotropic training runs")
    ap.add_argument("--seed", type=int, default=0, help="OPQ / k-means seed and the trainers' hold-out seed")
    ap.add_argument("--out", default=str(RESULTS / "anisotropic_init.md"))
    args = ap.parse_args(argv)

    from jpq.index import anisotropic_codebooks
    from jpq.metrics import evaluate
    from jpq.pipeline import build_index, load_workspace, m_for_ratio
    from jpq.train import JPQTrainer, TrainConfig

    ws = load_workspace(args.data, progress=False)
    ids = ws.train_ids()
    q = ws.query_emb[ws.query_rows(ids)]
    qrels = ws.dataset.qrels[ws.train_split]
    ratios = [int(r) for r in args.ratios.split(",")]
    etas = [float(e) for e in args.etas.split(",")]
    t_all = time.perf_counter()

    def metrics(index):
        m = evaluate((index.search(q, 100)[1], ids, ws.dataset.corpus_ids), qrels, ("ndcg@10", "recall@100"))
        return m["ndcg@10"], m["recall@100"]

    exact = evaluate((np.argsort(-(q @ ws.doc_emb.T), 1)[:, :100], ids, ws.dataset.corpus_ids), qrels,
                     ("ndcg@10", "recall@100"))
    lines = [f"# Anisotropic initial codebooks vs plain OPQ on {ws.dataset.name}", "",
             f"## Post-hoc indexes, zero-shot queries of all {len(ids)} train-split queries",
             "", f"Exact search: nDCG@10 {exact['ndcg@10']:.4f}, Recall@100 {exact['recall@100']:.4f}. "
             "eta = 1 is the OPQ index itself; `mse` the mean squared reconstruction error, `par` its part "
             "along the document vectors (in the rotated space); seconds to fit the anisotropic codebooks.", "",
             "| ratio | eta | nDCG@10 | Recall@100 | mse | par | seconds |", "|---|---|---|---|---|---|---|"]
    indexes = {}
    for ratio in ratios:
        base = build_index(ws.doc_emb, m_for_ratio(ws.d, ratio), opq=True, seed=args.seed)
        indexes[ratio] = base
        for eta in [1.0, *etas]:
            t0 = time.perf_counter()
            ix = base if eta == 1.0 else anisotropic_codebooks(base, ws.doc_emb, eta=eta, seed=args.seed)
            secs = time.perf_counter() - t0
            nd, rc = metrics(ix)
            mse, par = error_parts(ix, ws.doc_emb)
            lines.append(f"| {ratio}x | {eta:g} | {nd:.4f} | {rc:.4f} | {mse:.4f} | {par:.4f} | {secs:.1f} |")
            print(lines[-1], flush=True)
    if args.train:
        lines += ["", f"## JPQ selection runs (held-out fifth of the train split, seed {args.seed}, no refit)", "",
                  "| ratio | eta | epoch 0 | selected | epochs run | seconds |", "|---|---|---|---|---|---|"]
        rows = dict(zip(ws.dataset.query_ids, ws.query_emb))
        for ratio in (r for r in (32, 96) if r in indexes):
            for eta in (1.0, args.train_eta):
                t0 = time.perf_counter()
                cfg = TrainConfig(mode="jpq", lr_centroids=1e-3, anisotropic_eta=eta, seed=args.seed)
                tr = JPQTrainer(cfg, ws.doc_emb, copy.deepcopy(indexes[ratio]), ws.train_ids(),
                                ws.train_qrels_by_row(), query_texts=ws.query_texts(), query_embeddings=rows,
                                encoder=copy.deepcopy(ws.encoder), progress=False)
                tr.fit()
                h = tr.state.history
                lines.append(f"| {ratio}x | {eta:g} | {h[0]['val']:.4f} | {tr.state.best_score:.4f} "
                             f"(epoch {tr.state.best_epoch}) | {h[-1]['epoch']} | {time.perf_counter() - t0:.0f} |")
                print(lines[-1], flush=True)
    cmd = command_line(__file__, argv)
    lines += ["", f"Command: `{cmd}` ({time.perf_counter() - t_all:.0f} s on {cpu_model()})."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
