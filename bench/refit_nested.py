"""Does refitting on all training queries help? A nested hold-out on the train split only.

    python bench/refit_nested.py            # SciFact (+ precomputed MiniLM embeddings), ~10 min

The train split's queries are cut into an outer 80% / 20% (`holdout_split`, seed 123). On the 80%,
each run does what `jpq demo` does (select the epoch count on a held-out quarter of it = 20% of the
split), and is scored on the outer 20% twice: as selected, and refit on the whole 80% for the
selected epochs (`refit`), with the package's defaults (unseen guard and corpus reconstruction
included). The test split is never read. Writes bench/results/refit_nested.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, NestedHoldout, cpu_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args(argv)

    from jpq.pipeline import build_index, m_for_ratio
    from jpq.train import TrainConfig
    from jpq.tree import TreeConfig, build_and_train_tree, qrels_to_rows

    nested = NestedHoldout(args.data, seed=args.seed, pseudo_queries=False)
    ws, ids, inner, outer = nested.ws, nested.ids, nested.inner, nested.outer
    lines = [f"# Refit or not: nested hold-out on {ws.dataset.name}'s train split", "",
             f"{len(inner)} queries to train and select on (a quarter held out for selection), "
             f"{len(outer)} outer queries scored; nDCG@10 on the outer queries. The test split is not read.", "",
             "| run | selected epochs | as selected | refit on all inner queries |", "|---|---|---|---|"]
    t_all = time.perf_counter()
    runs = [("uncompressed-trained", "encoder", None, 1e-4), ("jpq-centroids 32x", "centroids", 32, 1e-3),
            ("jpq-centroids 96x", "centroids", 96, 1e-3), ("jpq 32x", "jpq", 32, 1e-3)]
    for name, mode, ratio, lr in runs:
        index = None if ratio is None else build_index(ws.doc_emb, m_for_ratio(ws.d, ratio), opq=True, seed=0)

        def trainer(cfg):
            return nested.trainer(cfg, index, encoder=mode != "centroids")
        cfg = TrainConfig(mode=mode, lr_centroids=lr, val_fraction=0.25)
        sel = trainer(cfg)
        sel.fit()
        a = sel.evaluate_ids(outer)["ndcg@10"]
        if sel.state.best_epoch == 0:  # the initial state was selected: train_run refits nothing
            lines.append(f"| {name} | 0 | {a:.4f} | (no refit: epoch 0 selected) |")
            print(lines[-1], flush=True)
            continue
        ref = trainer(dataclasses.replace(cfg, val_fraction=0.0, epochs=sel.state.best_epoch))
        ref.fit()
        b = ref.evaluate_ids(outer)["ndcg@10"]
        lines.append(f"| {name} | {sel.state.best_epoch} | {a:.4f} | {b:.4f} |")
        print(lines[-1], flush=True)
    qr = qrels_to_rows(ws.dataset, ws.train_split)
    q_all = dict(zip(ids, ws.query_emb[ws.query_rows(ids)]))  # outer queries are only scored
    scores = []
    for refit in (False, True):
        _, _, tr = build_and_train_tree(ws.doc_emb, q_all, inner, qr, TreeConfig(refit=refit, val_fraction=0.25),
                                        progress=False)
        scores.append((tr.selected.state.best_epoch, tr.evaluate_ids(outer)))
    (ep, a), (_, b) = scores
    lines.append(f"| tree (score: mean of nDCG@10 and Recall@100 at 5/10/20% scored) | {ep} | "
                 f"{a['score']:.4f} | {format(b['score'], '.4f') if ep else '(no refit: epoch 0 selected)'} |")
    print(lines[-1])
    lines += ["", f"Command: `python bench/refit_nested.py` ({time.perf_counter() - t_all:.0f} s on {cpu_model()})."]
    out = RESULTS / "refit_nested.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
