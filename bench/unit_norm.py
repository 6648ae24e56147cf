"""Unit-norm reconstructions (`PQIndex(unit_norm=True)`) or plain ones: the comparison behind the option.

    python bench/unit_norm.py            # post-hoc indexes only, seeds 0-2, ~2 min
    python bench/unit_norm.py --train    # + centroids-only and JPQ selection runs at 96x, ~30 min

MiniLM's vectors have unit norm; a PQ reconstruction is shorter by its quantization error, by a
different amount for every document, so a document that quantizes badly also loses score for it.
`unit_norm` rescales every reconstruction to unit norm (no byte added: the norm is known).

Post-hoc part (no training, no labels used to build anything): for each seed and ratio, the PQ and
OPQ indexes the demo builds, searched with plain and with unit-norm reconstructions by the
zero-shot vectors of *all* train-split queries (the test split is never read): nDCG@10 and
Recall@100, and the spread of the reconstruction norms.

--train: per seed, `jpq.pipeline.train_run(..., select_only=True)` (the demo's selection runs: the
trainer's own held-out fifth of the train split, no refit) for centroids-only and JPQ full on the
OPQ index, identical but for `unit_norm`, at the centroid rate and pseudo-query weight the demo
chose at these ratios on all three splits (1e-3, 1): the held-out nDCG@10 selected and its epoch.
Writes bench/results/unit_norm.md and .json.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, write_report  # noqa: E402


def with_unit_norm(index):
    """The same codes, centroids and rotation, searched with unit-norm reconstructions (training
    never depends on the flag: building with unit_norm=True gives these very codes)."""
    out = copy.copy(index)
    out.unit_norm = True
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--ratios", default="16,32,64,96")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train", action="store_true", help="also the selection runs at --train-ratios")
    ap.add_argument("--train-ratios", default="96")
    ap.add_argument("--out", default=str(RESULTS / "unit_norm.md"))
    args = ap.parse_args(argv)

    from jpq.metrics import evaluate
    from jpq.pipeline import build_index, load_workspace, m_for_ratio, train_run
    from jpq.train import TrainConfig

    ws = load_workspace(args.data, progress=False)
    ids = ws.train_ids()
    q = ws.query_emb[ws.query_rows(ids)]
    qrels = ws.dataset.qrels[ws.train_split]
    norms = np.linalg.norm(ws.doc_emb, axis=1)
    ratios = [int(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    t_all = time.perf_counter()

    def metrics(index):
        m = evaluate((index.search(q, 100)[1], ids, ws.dataset.corpus_ids), qrels, ("ndcg@10", "recall@100"))
        return m["ndcg@10"], m["recall@100"]

    lines = [f"# Unit-norm vs plain PQ reconstructions on {ws.dataset.name}", "",
             f"Document vector norms: {norms.min():.5f} .. {norms.max():.5f}.", "",
             f"## Post-hoc indexes, zero-shot queries of all {len(ids)} train-split queries", "",
             "nDCG@10 / Recall@100, plain -> unit-norm; `norm` is the mean (std) of the plain "
             "reconstructions' norms.", "",
             "| seed | ratio | index | plain | unit-norm | nDCG@10 change | norm |", "|---|---|---|---|---|---|---|"]
    records = []
    indexes = {}
    for seed in seeds:
        for ratio in ratios:
            for name, opq in (("pq", False), ("opq", True)):
                plain = build_index(ws.doc_emb, m_for_ratio(ws.d, ratio), opq=opq, seed=seed)
                rn = plain.reconstruction_norms()
                unit = with_unit_norm(plain)
                if opq:
                    indexes[(seed, ratio)] = (plain, unit)
                (n0, r0), (n1, r1) = metrics(plain), metrics(unit)
                records.append({"part": "post-hoc", "seed": seed, "ratio": ratio, "index": name,
                                "plain": {"ndcg@10": n0, "recall@100": r0}, "unit_norm": {"ndcg@10": n1, "recall@100": r1},
                                "norm_mean": float(rn.mean()), "norm_std": float(rn.std())})
                lines.append(f"| {seed} | {ratio}x | {name} | {n0:.4f} / {r0:.4f} | {n1:.4f} / {r1:.4f} | "
                             f"{n1 - n0:+.4f} | {rn.mean():.3f} ({rn.std():.3f}) |")
                print(lines[-1], flush=True)
    for name in ("pq", "opq"):
        for ratio in ratios:
            d = [r["unit_norm"]["ndcg@10"] - r["plain"]["ndcg@10"] for r in records
                 if r["index"] == name and r["ratio"] == ratio]
            lines.append(f"- {name} {ratio}x: mean nDCG@10 change {np.mean(d):+.4f} over {len(d)} seeds "
                         f"({', '.join(f'{x:+.4f}' for x in d)})")
    if args.train:
        lines += ["", "## Selection runs (held-out fifth of the train split, the demo's selection, no refit)", "",
                  "Centroid rate 1e-3, pseudo-query weight 1 (the demo's choice at 96x on seeds 0, 1 and 2).", "",
                  "| seed | ratio | mode | plain: held-out nDCG@10 (epoch) | unit-norm | change | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for ratio in (int(r) for r in args.train_ratios.split(",")):
            for mode in ("centroids", "jpq"):
                for seed in seeds:
                    if (seed, ratio) not in indexes:
                        plain = build_index(ws.doc_emb, m_for_ratio(ws.d, ratio), opq=True, seed=seed)
                        indexes[(seed, ratio)] = (plain, with_unit_norm(plain))
                    got = []
                    for index in indexes[(seed, ratio)]:
                        cfg = TrainConfig(mode=mode, lr_centroids=1e-3, pseudo_query_weight=1.0, seed=seed)
                        _, secs, sel = train_run(ws, cfg, index, None, progress=False, select_only=True)
                        got.append((float(sel.best_score), sel.best_epoch, secs,
                                    [h.get("val") for h in sel.history]))
                    (v0, e0, s0, c0), (v1, e1, s1, c1) = got
                    records.append({"part": "selection", "seed": seed, "ratio": ratio, "mode": mode,
                                    "plain": {"val": v0, "epoch": e0, "curve": c0, "seconds": s0},
                                    "unit_norm": {"val": v1, "epoch": e1, "curve": c1, "seconds": s1}})
                    lines.append(f"| {seed} | {ratio}x | {mode} | {v0:.4f} ({e0}) | {v1:.4f} ({e1}) | {v1 - v0:+.4f} "
                                 f"| {s0:.0f} / {s1:.0f} |")
                    print(lines[-1], flush=True)
    write_report(Path(args.out), lines, records, __file__, argv, t_all)


if __name__ == "__main__":
    main()
