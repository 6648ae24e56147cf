"""Query-aware initial codebooks or plain OPQ: the held-out comparison behind the default.

    python bench/query_aware_init.py          # SciFact (+ precomputed MiniLM embeddings), ~15 min
    python bench/query_aware_init.py --quick  # centroids-only rows only, ~5 min

For each row, two `JPQTrainer`s on the same split of the train split (the trainer's own held-out
fifth, seed 0), the same OPQ index and the same hyper-parameters, one with
`TrainConfig.query_aware_init` off and one with it on (`jpq.index.query_aware_codebooks`, S from the
kept training queries only). Reported: held-out nDCG@10 at epoch 0 (the initial index, zero-shot
queries) and at the selected epoch (no refit). The test split is never read. Writes
bench/results/query_aware_init.md.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, SCIFACT, command_line, cpu_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SCIFACT))
    ap.add_argument("--quick", action="store_true", help="centroids-only rows only")
    ap.add_argument("--out", default=str(RESULTS / "query_aware_init.md"))
    args = ap.parse_args(argv)

    from jpq.pipeline import build_index, load_workspace, m_for_ratio
    from jpq.train import JPQTrainer, TrainConfig

    ws = load_workspace(args.data, progress=False)
    rows = dict(zip(ws.dataset.query_ids, ws.query_emb))
    runs = [("jpq-centroids", "centroids", r, lr) for r in (16, 32, 64, 96) for lr in (1e-4, 1e-3)]
    if not args.quick:
        runs += [("jpq", "jpq", 96, 1e-3)]
    lines = [f"# Query-aware initial codebooks vs plain OPQ on {ws.dataset.name}'s held-out train queries", "",
             "nDCG@10 of the trainer's held-out fifth of the train split: at epoch 0 (the initial index) and at "
             "the selected epoch (early stopping, unseen guard; no refit). Same split, OPQ index and "
             "hyper-parameters in each pair; only `query_aware_init` differs. The test split is not read.", "",
             "| run | lr centroids | epoch 0: OPQ | epoch 0: query-aware | selected: OPQ | selected: query-aware |",
             "|---|---|---|---|---|---|"]
    t_all = time.perf_counter()
    for name, mode, ratio, lr in runs:
        index = build_index(ws.doc_emb, m_for_ratio(ws.d, ratio), opq=True, seed=0)
        res = []
        for aware in (False, True):
            cfg = TrainConfig(mode=mode, lr_centroids=lr, query_aware_init=aware)
            tr = JPQTrainer(cfg, ws.doc_emb, copy.deepcopy(index), ws.train_ids(), ws.train_qrels_by_row(),
                            query_texts=ws.query_texts(), query_embeddings=rows, progress=False,
                            encoder=copy.deepcopy(ws.encoder) if mode == "jpq" else None)
            tr.fit()
            h = tr.state.history
            res.append((h[0]["val"], tr.state.best_score, tr.state.best_epoch))
        (a0, ab, ae), (b0, bb, be) = res
        lines.append(f"| {name} {ratio}x | {lr:g} | {a0:.4f} | {b0:.4f} | {ab:.4f} (epoch {ae}) | {bb:.4f} (epoch {be}) |")
        print(lines[-1], flush=True)
    cmd = command_line(__file__, argv)
    lines += ["", f"Command: `{cmd}` ({time.perf_counter() - t_all:.0f} s on {cpu_model()})."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
