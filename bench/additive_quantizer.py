"""OPQ or an additive quantizer at the same bytes per vector, post hoc: is it a lever on a small corpus?

    python bench/additive_quantizer.py [--ratios 32,96] [--lsq-ratios 96]     # ~4 min on SciFact

JPQ starts from OPQ; at 96x (16 bytes per 384-d vector) the quantization error of documents no
training query points to is what keeps it below uncompressed-trained. An additive quantizer
(faiss's ResidualQuantizer, beam 1, and LocalSearchQuantizer) spends the same M bytes per vector
on M codebooks of 256 *full-dimensional* centroids, and scores with the same kind of lookup table
(the table's entries are q . c instead of sub-vector products), so it would fit jpq's ADC kernels.
This script measures, with no training and no labels used to build anything: squared
reconstruction error and nDCG@10 / Recall@100 of the zero-shot queries of the whole train split
(the test split is never read) against the reconstructed vectors, and what each stores: the codes,
the codebooks (and OPQ's rotation), and the resulting corpus-wide ratio, raw float32 vectors over
codes plus codebooks. Writes bench/results/additive_quantizer.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, command_line, cpu_model  # noqa: E402


def stored_bytes(n: int, d: int, M: int, kind: str) -> dict:
    """Bytes of the codes and of the codebooks of an 8-bit quantizer with M codes per vector."""
    codebooks = {"opq": 256 * d + d * d, "rq": M * 256 * d, "lsq": M * 256 * d}[kind] * 4  # OPQ: + rotation
    return {"codes": n * M, "codebooks": codebooks, "ratio": round(n * d * 4 / (n * M + codebooks), 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--ratios", default="32,96")
    ap.add_argument("--lsq-ratios", default="96", help="ratios that also train a LocalSearchQuantizer (slow)")
    ap.add_argument("--out", default=str(RESULTS / "additive_quantizer.md"))
    args = ap.parse_args(argv)

    import faiss

    from jpq.metrics import evaluate
    from jpq.pipeline import build_index, load_workspace, m_for_ratio

    ws = load_workspace(args.data, progress=False)
    ids = ws.train_ids()
    q = ws.query_emb[ws.query_rows(ids)]
    qrels = ws.dataset.qrels[ws.train_split]
    x = np.ascontiguousarray(ws.doc_emb, dtype=np.float32)
    n, d = x.shape
    lsq_ratios = {int(r) for r in args.lsq_ratios.split(",") if r}

    def row(name, M, recon, kind, secs):
        top = np.argsort(-(q @ recon.T), axis=1)[:, :100]
        m = evaluate((top, ids, ws.dataset.corpus_ids), qrels, ("ndcg@10", "recall@100"))
        b = stored_bytes(n, d, M, kind) if kind else {"codes": n * d * 4, "codebooks": 0, "ratio": 1.0}
        line = (f"| {name} | {M or '-'} | {float(((x - recon) ** 2).sum(1).mean()):.4f} | {m['ndcg@10']:.4f} | "
                f"{m['recall@100']:.4f} | {b['codes'] / 1024:.0f} | {b['codebooks'] / 1024:.0f} | {b['ratio']:g} | {secs:.0f} |")
        print(line, flush=True)
        return line

    t_all = time.perf_counter()
    lines = [f"# OPQ or an additive quantizer at the same bytes per vector, post hoc ({ws.dataset.name})", "",
             f"{n} documents, d = {d}; zero-shot queries of the {len(ids)} train-split queries with positives "
             "(the test split is not read). KiB of codes and of codebooks (OPQ: with its rotation); 'ratio': raw "
             "float32 vectors over codes plus codebooks.", "",
             "| index | M (bytes) | squared error | nDCG@10 | R@100 | codes KiB | codebooks KiB | ratio | seconds |",
             "|---|---|---|---|---|---|---|---|---|", row("uncompressed", 0, x, None, 0)]
    for ratio in [int(r) for r in args.ratios.split(",")]:
        M = m_for_ratio(d, ratio)
        t0 = time.perf_counter()
        index = build_index(x, M, opq=True, seed=0)
        lines.append(row(f"OPQ {ratio}x", M, index.reconstruct_n(), "opq", time.perf_counter() - t0))
        t0 = time.perf_counter()
        rq = faiss.ResidualQuantizer(d, M, 8)
        rq.max_beam_size = 1
        rq.train(x)
        lines.append(row(f"RQ {ratio}x (beam 1)", M, rq.decode(rq.compute_codes(x)), "rq", time.perf_counter() - t0))
        if ratio in lsq_ratios:
            t0 = time.perf_counter()
            lsq = faiss.LocalSearchQuantizer(d, M, 8)
            lsq.train(x)
            lines.append(row(f"LSQ {ratio}x", M, lsq.decode(lsq.compute_codes(x)), "lsq", time.perf_counter() - t0))
    lines += ["", f"Command: `{command_line(__file__, argv)}` ({time.perf_counter() - t_all:.0f} s on {cpu_model()})."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
