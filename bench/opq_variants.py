"""Two label-free OPQ variants at the same bytes per vector, post hoc: is either a lever?

    python bench/opq_variants.py [--ratios 32,96] [--seeds 8] [--dims 384,192,96]   # ~20 min on SciFact

JPQ starts from OPQ, and at 96x (16 bytes per 384-d vector) the quantization error of documents no
training query points to is what keeps it below uncompressed-trained. Two ways to spend the same
16 bytes better that need no labels, measured with no training:

- *Restarts*: OPQ from several k-means seeds, keeping the one with the lowest reconstruction error
  (label-free), or the one that scores best on held-out training queries. Worth it only if that
  choice carries over to other queries: the table gives per seed the error and nDCG@10 on two
  random halves A and B of the train-split queries, with the rank correlation of the error with
  nDCG@10 and of half A's nDCG@10 with half B's.
- *Dimension reduction* (faiss's `OPQ16_128,PQ16`): OPQ's rotation to d2 < d dimensions before PQ,
  so each byte quantizes d2 / M dimensions instead of d / M, and the rest of each vector is dropped.

Scored as in bench/additive_quantizer.py: zero-shot queries of the whole train split (the test split
is never read), nDCG@10 against the reconstructed vectors. Writes bench/results/opq_variants.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, command_line, cpu_model  # noqa: E402


def spearman(a, b) -> float:
    """Rank correlation of two equally long sequences (no ties expected in float scores)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def reduced_opq_reconstruction(x: np.ndarray, queries: np.ndarray, M: int, d_out: int, seed: int):
    """faiss OPQMatrix(d, M, d_out) + 8-bit IndexPQ: the rotated-and-reduced document
    reconstructions and queries, whose inner products are the index's scores."""
    import faiss

    opq = faiss.OPQMatrix(x.shape[1], M, d_out)
    opq.niter = 60  # as many alternations as jpq's own OPQ
    pq = faiss.IndexPQ(d_out, M, 8, faiss.METRIC_INNER_PRODUCT)
    pq.pq.cp.seed = seed
    index = faiss.IndexPreTransform(opq, pq)
    index.train(x)
    y = opq.apply_py(x)
    return pq.pq.decode(pq.pq.compute_codes(y)), opq.apply_py(queries), y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--ratios", default="32,96")
    ap.add_argument("--seeds", type=int, default=8, help="k-means seeds of jpq's OPQ per ratio")
    ap.add_argument("--dims", default="384,288,192,144,128,96,64,48",
                    help="faiss OPQ output dimensions (those that are not a multiple of a ratio's M are skipped there)")
    ap.add_argument("--dim-seeds", type=int, default=2, help="k-means seeds per output dimension")
    ap.add_argument("--out", default=str(RESULTS / "opq_variants.md"))
    args = ap.parse_args(argv)

    from jpq.metrics import evaluate
    from jpq.pipeline import build_index, load_workspace, m_for_ratio

    ws = load_workspace(args.data, progress=False)
    ids = ws.train_ids()
    q = np.ascontiguousarray(ws.query_emb[ws.query_rows(ids)], dtype=np.float32)
    qrels = ws.dataset.qrels[ws.train_split]
    x = np.ascontiguousarray(ws.doc_emb, dtype=np.float32)
    n, d = x.shape

    def ndcg(queries, recon, rows=None) -> float:
        rows = np.arange(len(ids)) if rows is None else rows
        top = np.argsort(-(queries[rows] @ recon.T), axis=1)[:, :100]
        sub = [ids[i] for i in rows]
        return float(evaluate((top, sub, ws.dataset.corpus_ids), {i: qrels[i] for i in sub}, ("ndcg@10",))["ndcg@10"])

    half = np.random.default_rng(123).permutation(len(ids))
    half_a, half_b = np.sort(half[: len(ids) // 2]), np.sort(half[len(ids) // 2:])

    t_all = time.perf_counter()
    lines = [f"# OPQ restarts and OPQ with dimension reduction, post hoc ({ws.dataset.name})", "",
             f"{n} documents, d = {d}; zero-shot queries of the {len(ids)} train-split queries with positives "
             f"(the test split is not read); uncompressed nDCG@10 {ndcg(q, x):.4f}.", ""]
    for ratio in [int(r) for r in args.ratios.split(",")]:
        M = m_for_ratio(d, ratio)
        lines += [f"## {ratio}x (M = {M}, 8 bits)", "", "Restarts: jpq's OPQ (`build_index(opq=True)`), one row per k-means seed.",
                  "", "| seed | squared error | nDCG@10 | half A | half B |", "|---|---|---|---|---|"]
        errors, scores, on_a, on_b = [], [], [], []
        for seed in range(args.seeds):
            recon = build_index(x, M, opq=True, seed=seed).reconstruct_n()
            errors.append(float(((x - recon) ** 2).sum(1).mean()))
            scores.append(ndcg(q, recon))
            on_a.append(ndcg(q, recon, half_a))
            on_b.append(ndcg(q, recon, half_b))
            lines.append(f"| {seed} | {errors[-1]:.5f} | {scores[-1]:.4f} | {on_a[-1]:.4f} | {on_b[-1]:.4f} |")
            print(ratio, seed, lines[-1], flush=True)
        best, best_a = int(np.argmin(errors)), int(np.argmax(on_a))
        lines += ["", f"nDCG@10 over seeds: mean {np.mean(scores):.4f}, min {min(scores):.4f}, max {max(scores):.4f}; "
                  f"the lowest-error seed ({best}) scores {scores[best]:.4f}; Spearman(error, nDCG@10) "
                  f"{spearman(errors, scores):+.2f} (a label-free restart rule needs it clearly negative). "
                  f"Chosen on half A, seed {best_a} scores {on_b[best_a]:.4f} on half B (mean over seeds "
                  f"{np.mean(on_b):.4f}, best {max(on_b):.4f}); Spearman(half A, half B) {spearman(on_a, on_b):+.2f}.", "",
                  "Dimension reduction: faiss `OPQMatrix(d, M, d_out)` + `IndexPQ`, same bytes per vector.", "",
                  "| d_out | dims per byte | " + " | ".join(f"nDCG@10 seed {s}" for s in range(args.dim_seeds))
                  + " | mean | squared error (seed 0, dropped dimensions included) |",
                  "|---|---|" + "---|" * args.dim_seeds + "---|---|"]
        for d_out in [int(v) for v in args.dims.split(",")]:
            if d_out > d:
                raise SystemExit(f"--dims: {d_out} is more than d = {d}")
            if d_out % M:
                continue
            row, error = [], None
            for seed in range(args.dim_seeds):
                recon, q_rot, y = reduced_opq_reconstruction(x, q, M, d_out, seed)
                row.append(ndcg(q_rot, recon))
                if error is None:  # the rotation's rows are orthonormal: dropped energy + quantization error
                    error = float(((y - recon) ** 2).sum(1).mean() + (x ** 2).sum(1).mean() - (y ** 2).sum(1).mean())
            lines.append(f"| {d_out} | {d_out // M} | " + " | ".join(f"{s:.4f}" for s in row)
                         + f" | {np.mean(row):.4f} | {error:.5f} |")
            print(ratio, lines[-1], flush=True)
        lines.append("")
    lines.append(f"Command: `{command_line(__file__, argv)}` ({time.perf_counter() - t_all:.0f} s on {cpu_model()}).")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
