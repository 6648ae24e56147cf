"""Post hoc: what the corpus alone can teach OPQ's centroids, before any query or judgment.

    python bench/pseudo_query_posthoc.py [--ratio 96] [--seeds 0,1] [--epochs 6]   # ~1 min per seed

From a post-hoc OPQ index, only the centroids are trained (rotation and codes fixed, no query
tower) on each document's title pseudo-query (`jpq.data.title_queries`, embedded by the frozen
encoder: the corpus is the only input), with one of two losses, and with or without the
trainer's corpus reconstruction term (`TrainConfig.corpus_recon_weight`, 512 random documents):

- "ce": softmax cross-entropy over the whole corpus, the title's own document the one positive
  (the demo's pseudo-query term, there against the index's hard negatives);
- "kl": distilling the uncompressed ranking (Distill-VQ style): KL divergence from the softmax of
  the exact scores of each pseudo-query's top 100 documents to the softmax of their ADC scores.

Scored after every other epoch by zero-shot nDCG@10 / Recall@100 of the train split's real queries
(none of them trained on; the test split is never read) against the post-hoc index's.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, command_line, cpu_model  # noqa: E402

VARIANTS = (("kl", 0.0), ("ce", 0.0), ("ce", 1.0), ("ce", 10.0))
SCALE = 50.0  # TrainConfig.scale
CANDIDATES = 100


def train_centroids(index, X, P, loss: str, recon: float, epochs: int, seed: int, score, lr: float = 1e-3,
                    batch: int = 64) -> dict:
    """Train a copy of index's centroids on pseudo-queries P; {epoch: score(copy)} every other epoch."""
    torch.manual_seed(seed)
    R = torch.from_numpy(index.rotation)
    Xt, Pt = torch.from_numpy(X), torch.from_numpy(P)
    Xr, Pr = Xt @ R.T, Pt @ R.T
    centroids = torch.nn.Parameter(torch.from_numpy(index.centroids.copy()))
    codes = torch.from_numpy(index.codes).long()
    subspaces = torch.arange(codes.shape[1])
    opt = torch.optim.Adam([centroids], lr=lr)
    teacher = torch.topk(Pt @ Xt.T, CANDIDATES, dim=1)  # exact scores of each pseudo-query's top documents
    out, trained = {}, copy.copy(index)
    for epoch in range(1, epochs + 1):
        for batch_rows in torch.randperm(len(P)).split(batch):
            x_hat = centroids[subspaces, codes].reshape(len(X), -1)  # every reconstruction, rotated space
            q = Pr[batch_rows]
            if loss == "ce":
                value = F.cross_entropy(SCALE * (q @ x_hat.T), batch_rows)
            else:
                student = SCALE * torch.einsum("bd,bcd->bc", q, x_hat[teacher.indices[batch_rows]])
                value = F.kl_div(F.log_softmax(student, 1), F.log_softmax(SCALE * teacher.values[batch_rows], 1),
                                 log_target=True, reduction="batchmean")
            if recon > 0:
                rows = torch.randint(0, len(X), (512,))
                value = value + recon * ((Xr[rows] - x_hat[rows]) ** 2).sum(1).mean()
            opt.zero_grad()
            value.backward()
            opt.step()
        if epoch % 2 == 0 or epoch == epochs:
            trained.centroids = centroids.detach().numpy().copy()
            out[epoch] = score(trained)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--embeddings", default=None)
    ap.add_argument("--ratio", type=int, default=96)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", default=str(RESULTS / "pseudo_query_posthoc.md"))
    args = ap.parse_args(argv)

    from jpq.metrics import evaluate
    from jpq.pipeline import build_index, load_workspace, m_for_ratio

    t_all = time.perf_counter()
    ws = load_workspace(args.data, embeddings=args.embeddings, progress=False)
    X, P = ws.doc_emb, ws.pseudo_query_emb(progress=False)
    qrels_rows = ws.train_qrels_by_row()
    ids = [q for q in ws.train_ids() if qrels_rows.get(q)]
    Q = ws.query_emb[ws.query_rows(ids)]
    qrels = {q: {str(d): r for d, r in qrels_rows[q].items()} for q in ids}
    doc_ids = [str(i) for i in range(len(X))]

    def score(index):
        m = evaluate((index.search(Q, 100)[1], ids, doc_ids), qrels, ("ndcg@10", "recall@100"))
        return round(m["ndcg@10"], 4), round(m["recall@100"], 4)

    exact = torch.topk(torch.from_numpy(Q) @ torch.from_numpy(X).T, 100).indices.numpy()
    full = evaluate((exact, ids, doc_ids), qrels, ("ndcg@10", "recall@100"))
    lines = [f"# Centroids trained on the corpus's pseudo-queries alone ({ws.dataset.name}, {args.ratio}x OPQ)", "",
             f"Zero-shot nDCG@10 / Recall@100 of the {len(ids)} train-split queries (never trained on); "
             f"uncompressed: {full['ndcg@10']:.4f} / {full['recall@100']:.4f}. Each row trains a copy of the "
             "post-hoc OPQ index's centroids on the title pseudo-queries (loss, corpus reconstruction weight); "
             "columns: after that many epochs over them. Test split not read.", ""]
    for seed in [int(s) for s in args.seeds.split(",")]:
        index = build_index(X, m_for_ratio(X.shape[1], args.ratio), opq=True, seed=seed)
        base = score(index)
        runs = {v: train_centroids(index, X, P, v[0], v[1], args.epochs, seed, score) for v in VARIANTS}
        epochs = sorted(next(iter(runs.values())))
        lines += [f"Seed {seed}: post-hoc OPQ {base[0]:.4f} / {base[1]:.4f}", "",
                  "| loss | recon weight | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
                  "|---|---|" + "---|" * len(epochs)]
        lines += [f"| {loss} | {recon:g} | " + " | ".join(f"{runs[(loss, recon)][e][0]:.4f} / {runs[(loss, recon)][e][1]:.4f}"
                                                        for e in epochs) + " |" for loss, recon in VARIANTS]
        lines.append("")
        print("\n".join(lines[-len(VARIANTS) - 4:]), flush=True)
    lines.append(f"Command: `{command_line(__file__, argv)}` ({time.perf_counter() - t_all:.0f} s on {cpu_model()}).")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
