"""`jpq demo`: the main job. On a BEIR folder, compare at several compression ratios

    uncompressed | uncompressed-trained | faiss-style PQ | OPQ | JPQ centroids-only | JPQ full

on the test split (nDCG@10, MRR@10, Recall@100), training on the train split only with the same
default hyper-parameters for every dataset. Writes results.json (one record per method and
ratio), results.md (the table) and results.png (quality vs compression) to --out. Finished runs
are kept in --out and skipped when the demo is started again (resume).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path


from .metrics import mean_over_queries, paired_bootstrap
from .storage import atomic_write_json
from .pipeline import (EVAL_METRICS, build_index, evaluate_vectors, m_for_ratio, refit_run, selection_summary,
                       train_run)
from .train import TrainConfig

log = logging.getLogger(__name__)

METHODS = ("uncompressed", "uncompressed-trained", "pq", "opq", "jpq-centroids", "jpq")
# what JPQ full is compared with, query by query (paired bootstrap), in results.md and results.json
COMPARED_WITH = ("opq", "jpq-centroids", "uncompressed-trained")
DEFAULT_RATIOS = (16, 32, 64, 96)
# Centroid learning rates tried by the (cheap, frozen-encoder) centroids-only runs; the one with
# the best held-out validation score is used for JPQ full too. JPQ's own rates (1e-4 or lower)
# come first: a larger one is taken only when validation says it generalises.
DEFAULT_CENTROID_LRS = (1e-4, 1e-3)
# Pseudo-query weights (`TrainConfig.pseudo_query_weight`) tried alongside each rate: the term acts
# on the centroids only, so the same cheap runs choose it (ties: the smaller weight). On SciFact's
# held-out train queries (bench/results/pseudo_query_selection.md, three splits) they chose 1 at
# 96x on every split, where documents no training query points to lose most and JPQ full's
# held-out score then rose by 0.010-0.024; elsewhere the choice moved JPQ full by at most 0.002.
# A grid of 0, 1 and 3 chose 3 in four cells and lowered JPQ full there (mean -0.006 over the 12
# cells; at 32x on one split 0.808 -> 0.700): bench/results/pseudo_query_selection_w013.md.
DEFAULT_PSEUDO_QUERY_WEIGHTS = (0.0, 1.0)
# what the demo chooses itself: these TrainConfig fields are not read from its config
DEMO_CHOSEN_FIELDS = ("lr_centroids", "pseudo_query_weight")


def _record(method, ratio, M, per_q, seconds, **extra):
    """A results.json record from per-query test metrics ({metric: {query id: value}})."""
    means = mean_over_queries(per_q)
    return {"method": method, "ratio": ratio, "M": M, **{k: round(float(v), 6) for k, v in means.items()},
            "train_seconds": round(float(seconds), 2), **extra}


def _key(method, ratio) -> str:
    return f"{method}@{ratio}"


def paired_comparisons(records: list[dict], per_q: dict, resamples: int = 2000, seed: int = 0) -> list[dict]:
    """JPQ minus each of `COMPARED_WITH` at each ratio, paired over the test queries: per metric the
    mean difference and its 95% bootstrap interval (`jpq.metrics.paired_bootstrap`). per_q maps
    "method@ratio" to per-query metrics; a pair missing from it (a row from a jpq that kept no
    per-query values) is left out."""
    out = []
    for r in sorted((r for r in records if r["method"] == "jpq"), key=lambda r: r["ratio"]):
        ours = per_q.get(_key("jpq", r["ratio"]))
        for base in COMPARED_WITH:
            ratio = 1 if base == "uncompressed-trained" else r["ratio"]
            theirs = per_q.get(_key(base, ratio))
            if ours is None or theirs is None:
                continue
            for metric in EVAL_METRICS:
                out.append({"ratio": r["ratio"], "versus": base, "metric": metric,
                            **paired_bootstrap(ours[metric], theirs[metric], resamples, seed)})
    return out


def _settings(ws, config: TrainConfig, centroid_lrs, pseudo_query_weights) -> dict:
    """What the records in a demo folder depend on, besides the ratio: the training configuration
    (less the fields a resumed run may change, e.g. the device, and those the demo chooses), the
    centroid rates and pseudo-query weights tried, the encoder and the dataset's corpus and queries."""
    cfg = {k: v for k, v in asdict(config).items()
           if k not in TrainConfig.RESUME_FREE_FIELDS and k not in DEMO_CHOSEN_FIELDS}
    return {"config": json.loads(json.dumps(cfg)), "centroid_lrs": [float(x) for x in centroid_lrs],
            "pseudo_query_weights": [float(x) for x in pseudo_query_weights],
            "encoder": str(getattr(ws.encoder, "name", type(ws.encoder).__name__)),
            "dataset": ws.dataset.fingerprint("all"), "judgments": _judgments_fingerprint(ws)}


def _judgments_fingerprint(ws) -> str:
    """sha256 of the train split's qrels and the test split's evaluation qrels: rows scored against
    other judgments must not share a table."""
    ds = ws.dataset
    parts = {"train": ds.qrels[ws.train_split], "test": ds.evaluation_qrels(ws.test_split)}
    text = json.dumps({k: sorted((q, sorted(rel.items())) for q, rel in v.items()) for k, v in parts.items()})
    return hashlib.sha256(text.encode()).hexdigest()


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Finished rows in out_dir are reused only by a demo with the same settings: write them on the
    first start, refuse a different run in a folder that holds rows (they would mix with these;
    a folder whose earlier start finished no row takes the new settings). Rows
    without a settings.json (written by a jpq before it kept one) are refused too: what made them
    is unknown."""
    path = out_dir / "settings.json"
    has_rows = (out_dir / "partial.json").exists()
    if path.exists():
        old = json.loads(path.read_text())
        if old == settings:
            return
        if has_rows:
            diff = sorted({*_flat(old).items()} ^ {*_flat(settings).items()})
            keys = sorted({k for k, _ in diff})
            raise ValueError(f"{out_dir} holds demo results made with other settings ({', '.join(keys)} "
                             f"differ): pass the same options to resume it, or a fresh --out")
        # a start that finished no row (e.g. it crashed): nothing to mix, the new settings hold
    elif has_rows:
        raise ValueError(f"{out_dir} holds demo results without a settings.json (from an older jpq), so "
                         f"what made them is unknown: use a fresh --out")
    atomic_write_json(path, settings)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


def run_demo(ws, out_dir: Path, ratios=DEFAULT_RATIOS, config: TrainConfig | None = None, seed: int = 0,
             progress: bool = True, centroid_lrs=DEFAULT_CENTROID_LRS,
             pseudo_query_weights=DEFAULT_PSEUDO_QUERY_WEIGHTS) -> list[dict]:
    """Run every method at every ratio; returns the records (also written to out_dir).

    Per ratio, centroids-only runs try every centroid rate in `centroid_lrs` with every weight in
    `pseudo_query_weights`; the pair with the best held-out score (ties: the smaller weight, then
    the gentler rate) is the jpq-centroids row and is used for JPQ full. So `config.lr_centroids`
    and `config.pseudo_query_weight` are not read: pass one-element tuples to fix them."""
    centroid_lrs, pseudo_query_weights = tuple(centroid_lrs), tuple(pseudo_query_weights)
    for name, values in (("centroid_lrs", centroid_lrs), ("pseudo_query_weights", pseudo_query_weights)):
        if not values or not all(isinstance(v, (int, float)) and v >= 0 for v in values):
            raise ValueError(f"{name} must be a non-empty sequence of numbers >= 0, got {values!r}")
    if not all(v > 0 for v in centroid_lrs):
        raise ValueError(f"centroid_lrs must be > 0, got {centroid_lrs!r}")
    # everything the ratios need is known now: fail before any training, not hours into it
    ratios = tuple(ratios)
    if not ratios or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 1
                             for r in ratios):
        raise ValueError(f"ratios must be compression ratios > 1 (e.g. 16, 32, 64, 96), got {ratios!r}")
    if len(ws.doc_emb) < 256:
        raise ValueError(f"the demo's 8-bit PQ indexes need at least 256 documents to train, "
                         f"the corpus has {len(ws.doc_emb)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or TrainConfig(seed=seed)
    _check_settings(out_dir, _settings(ws, config, centroid_lrs, pseudo_query_weights))
    partial_path, per_query_path = out_dir / "partial.json", out_dir / "per_query.json"
    done = {(r["method"], r["ratio"]): r for r in json.loads(partial_path.read_text())} if partial_path.exists() else {}
    # per-query test metrics of every row, for the paired comparisons (rows of a jpq that kept none
    # have no entry)
    per_q = json.loads(per_query_path.read_text()) if per_query_path.exists() else {}
    test_ids = ws.test_ids()
    q_test = ws.query_emb[ws.query_rows(test_ids)]
    test_texts = [ws.dataset.query_texts[i] for i in ws.query_rows(test_ids)]

    def keep(rec, values):
        per_q[_key(rec["method"], rec["ratio"])] = values
        atomic_write_json(per_query_path, per_q)  # before the row: a row never lacks its values
        done[(rec["method"], rec["ratio"])] = rec
        atomic_write_json(partial_path, list(done.values()))
        log.info("%s @%sx: %s", rec["method"], rec["ratio"],
                 ", ".join(f"{m} {rec[m]:.4f}" for m in EVAL_METRICS))

    if ("uncompressed", 1) not in done:
        values = evaluate_vectors(ws, q_test, None, test_ids, per_query=True)
        keep(_record("uncompressed", 1, None, values, 0.0), values)
    if ("uncompressed-trained", 1) not in done:
        cfg = TrainConfig(**{**asdict(config), "mode": "encoder"})
        trainer, secs, sel = train_run(ws, cfg, None, out_dir / "checkpoints" / "uncompressed-trained",
                                       progress=progress)
        values = evaluate_vectors(ws, trainer.encode_queries(test_texts), None, test_ids, per_query=True)
        keep(_record("uncompressed-trained", 1, None, values, secs, **selection_summary(sel, trainer)), values)
    for ratio in ratios:
        M = m_for_ratio(ws.d, ratio)
        true_ratio = round(4 * ws.d / M, 2)
        indexes = {}
        for method, opq in (("pq", False), ("opq", True)):
            t0 = time.perf_counter()
            indexes[method] = build_index(ws.doc_emb, M, opq=opq, seed=seed)
            if (method, ratio) not in done:
                values = evaluate_vectors(ws, q_test, indexes[method], test_ids, per_query=True)
                keep(_record(method, ratio, M, values, time.perf_counter() - t0, bytes_per_vector=M,
                             exact_ratio=true_ratio), values)
        if ("jpq-centroids", ratio) not in done:
            runs = []
            for w in pseudo_query_weights:
                for lr in centroid_lrs:
                    cfg = TrainConfig(**{**asdict(config), "mode": "centroids", "lr_centroids": lr,
                                         "pseudo_query_weight": w})
                    name = f"jpq-centroids-{ratio}-lr{lr:g}" + (f"-w{w:g}" if w else "")
                    selected, secs, sel = train_run(ws, cfg, indexes["opq"], out_dir / "checkpoints" / name,
                                                    progress=progress, select_only=True)
                    runs.append((sel.best_score, -w, -lr, selected, secs, sel, cfg, name))
            # ties: the smaller weight, then the gentler rate; only the chosen run is refit
            _, neg_w, neg_lr, selected, _, sel, cfg, name = max(runs, key=lambda r: r[:3])
            trainer, refit_secs = refit_run(ws, cfg, indexes["opq"], out_dir / "checkpoints" / name, selected,
                                            progress=progress)
            index = trainer.trained_index()
            values = evaluate_vectors(ws, q_test, index, test_ids, per_query=True)
            keep(_record("jpq-centroids", ratio, M, values, sum(r[4] for r in runs) + refit_secs,
                         bytes_per_vector=M, exact_ratio=true_ratio, lr_centroids=-neg_lr,
                         pseudo_query_weight=-neg_w, **selection_summary(sel, trainer)), values)
            index.save(out_dir / "checkpoints" / f"jpq-centroids-{ratio}.jpq")
        if ("jpq", ratio) not in done:
            # JPQ full starts from the zero-shot tower. Starting its selection run from the
            # uncompressed-trained selection tower instead (as JPQ starts from a trained retriever)
            # moved the held-out score at 96x by +0.008 / -0.024 / -0.015 (seeds 0 / 1 / 2: the
            # warm runs stopped after 2-3 epochs on a plateau), so it is not done.
            chosen = done[("jpq-centroids", ratio)]
            lr, w = chosen["lr_centroids"], chosen["pseudo_query_weight"]
            cfg = TrainConfig(**{**asdict(config), "mode": "jpq", "lr_centroids": lr, "pseudo_query_weight": w})
            trainer, secs, sel = train_run(ws, cfg, indexes["opq"], out_dir / "checkpoints" / f"jpq-{ratio}",
                                           progress=progress)
            index = trainer.trained_index()
            values = evaluate_vectors(ws, trainer.encode_queries(test_texts), index, test_ids, per_query=True)
            keep(_record("jpq", ratio, M, values, secs, bytes_per_vector=M, exact_ratio=true_ratio,
                         lr_centroids=lr, pseudo_query_weight=w, **selection_summary(sel, trainer)), values)
            index.save(out_dir / "checkpoints" / f"jpq-{ratio}.jpq")
    order = {m: i for i, m in enumerate(METHODS)}
    records = sorted(done.values(), key=lambda r: (order.get(r["method"], 99), r["ratio"]))
    records = [r for r in records if r["ratio"] == 1 or r["ratio"] in ratios]
    paired = paired_comparisons(records, per_q, seed=seed)
    versus = {}  # ratio -> {method: {metric: comparison}}
    for p in paired:
        versus.setdefault(p["ratio"], {}).setdefault(p["versus"], {})[p["metric"]] = {
            "difference": round(p["difference"], 6), "ci95": [round(x, 6) for x in p["ci95"]]}
    for r in records:
        if r["method"] == "jpq":
            r["versus"] = versus.get(r["ratio"], {})
    atomic_write_json(out_dir / "results.json", records)
    (out_dir / "results.md").write_text(results_table(records, ws.dataset.name, paired))
    plot_results(records, out_dir / "results.png", ws.dataset.name)
    return records


def results_table(records: list[dict], name: str = "", paired: list[dict] | None = None) -> str:
    ratios = sorted({r["ratio"] for r in records if r["ratio"] != 1})
    by = {(r["method"], r["ratio"]): r for r in records}
    lines = [f"# jpq demo{': ' + name if name else ''} (test split)", "",
             "nDCG@10 / MRR@10 / R@100; training time in seconds.", "",
             "| method | " + " | ".join(f"{r}x" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for m in METHODS:
        cells = []
        for ratio in ratios:
            r = by.get((m, ratio)) or by.get((m, 1))
            cells.append("-" if r is None else
                         f"{r['ndcg@10']:.4f} / {r['mrr@10']:.4f} / {r['recall@100']:.4f} ({r['train_seconds']:.0f}s)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    chosen = [(ratio, by[("jpq-centroids", ratio)]) for ratio in ratios if ("jpq-centroids", ratio) in by]
    if chosen:
        lines += ["", "Chosen on held-out training queries by the centroids-only runs, used by JPQ full too "
                  "(centroid rate, pseudo-query weight): " + ", ".join(
                      f"{ratio}x ({r['lr_centroids']:g}, {r.get('pseudo_query_weight', 0.0):g})" for ratio, r in chosen)
                  + "."]
    if paired:
        compared = {(p["ratio"], p["versus"], p["metric"]): p for p in paired}
        bases = [b for b in COMPARED_WITH if any(p["versus"] == b for p in paired)]
        lines += ["", f"JPQ minus each method, nDCG@10, paired over the {paired[0]['queries']} test queries: mean "
                  f"difference [95% bootstrap interval, {paired[0]['resamples']} resamplings]; an interval that holds "
                  "0 is no measured difference.", "",
                  "| ratio | " + " | ".join(f"JPQ - {b}" for b in bases) + " |", "|---|" + "---|" * len(bases)]
        for ratio in sorted({p["ratio"] for p in paired}):
            cells = []
            for b in bases:
                p = compared.get((ratio, b, "ndcg@10"))
                cells.append("-" if p is None else
                             f"{p['difference']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]")
            lines.append(f"| {ratio}x | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(records: list[dict], path: Path, name: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ratios = sorted({r["ratio"] for r in records if r["ratio"] != 1})
    for ax, metric in zip(axes, EVAL_METRICS):
        for m in METHODS:
            rs = [r for r in records if r["method"] == m]
            if not rs:
                continue
            if rs[0]["ratio"] == 1:
                ax.axhline(rs[0][metric], ls=":" if m == "uncompressed" else "--", color="gray" if m == "uncompressed" else "black", label=m)
            else:
                rs.sort(key=lambda r: r["ratio"])
                ax.plot([r["ratio"] for r in rs], [r[metric] for r in rs], "o-", label=m)
        ax.set(xscale="log", xlabel="compression ratio (float32 bytes / code bytes)", ylabel=metric, title=metric)
        ax.minorticks_off()  # log-scale minor labels (3x10^1, ...) would overprint the ratios
        ax.set_xticks(ratios, [str(r) for r in ratios])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"jpq demo {name}: quality vs compression (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
