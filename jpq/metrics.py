"""Ranking metrics with trec_eval's definitions (nDCG@k, MRR@k, Recall@k, MAP@k, P@k).

Conventions (those of trec_eval / pytrec_eval, run with `-c` so missing queries count):

- A document is relevant when its qrels relevance is > 0. nDCG's gain is the relevance
  itself (linear, as in trec_eval's `ndcg_cut`; non-positive relevances give 0) with a
  `1 / log2(rank + 1)` discount; the ideal DCG@k ranks the qrels' positive relevances in
  decreasing order.
- The mean is over the queries of `qrels` with at least one relevant document; such a
  query missing from the run scores 0 on every metric. Run queries absent from qrels are
  ignored.
- Ranking of a `{qid: {doc_id: score}}` run: score descending, ties broken by doc id
  descending (string order), as trec_eval does. An `(I, query_ids, doc_ids)` run is
  already ranked: row order is rank order.
- MRR@k = 1 / rank of the first relevant document in the top k (0 if none);
  Recall@k = |relevant in top k| / |relevant|; P@k = |relevant in top k| / k (k, not the
  number retrieved); MAP@k = sum over relevant documents in the top k of P@rank, divided
  by |relevant| (trec_eval's `map_cut`).
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence, Union

import numpy as np

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]
RunLike = Union[Run, tuple]

METRICS = ("ndcg", "mrr", "recall", "map", "precision")
_NAME = re.compile(r"^(ndcg|mrr|recall|map|precision)@([1-9][0-9]*)$")


def run_from_topk(I: np.ndarray, D: np.ndarray, query_ids: Sequence[str],
                  doc_ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """Turn a top-k search result into a `{qid: {doc_id: score}}` run.

    Args:
        I: row positions into `doc_ids`, shape=(nq, k), integer dtype; -1 marks padding.
        D: scores (higher is better), shape=(nq, k), float dtype.
        query_ids: the id of each row of I, length nq.
        doc_ids: the id of each corpus row.

    A document listed twice for one query keeps its first (best-ranked) score.
    """
    I, D = np.asarray(I), np.asarray(D)
    _check_topk(I, query_ids, doc_ids)
    if D.shape != I.shape:
        raise ValueError(f"D must have the shape of I {I.shape}, got {D.shape}")
    run: dict[str, dict[str, float]] = {}
    for qid, rows, scores in zip(query_ids, I.tolist(), D.tolist()):
        docs = run.setdefault(str(qid), {})
        for row, s in zip(rows, scores):
            if row >= 0:
                docs.setdefault(doc_ids[row], float(s))
    return run


def evaluate(run: RunLike, qrels: Qrels,
             metrics: Sequence[str] = ("ndcg@10", "mrr@10", "recall@100")) -> dict[str, float]:
    """Mean of each metric over the queries of `qrels` that have a relevant document.

    Args:
        run: `{qid: {doc_id: score}}`, or `(I, query_ids, doc_ids)` with I of shape=(nq, k),
            integer dtype, -1 padded, rows already in rank order.
        qrels: `{qid: {doc_id: relevance}}`, e.g. `BeirDataset.evaluation_qrels("test")`.
        metrics: names "<metric>@<k>" with metric in ndcg, mrr, recall, map, precision.

    Returns:
        {metric name: mean value}.
    """
    return mean_over_queries(per_query(run, qrels, metrics))


def mean_over_queries(per_q: dict[str, dict[str, float]], query_ids: Sequence[str] | None = None,
                      metrics: Sequence[str] | None = None) -> dict[str, float]:
    """{metric: mean} of `per_query` output over `query_ids` (default: all of them) for `metrics`
    (default: all): what `evaluate` returns, for a subset of the queries without scoring them again."""
    out = {}
    for m in per_q if metrics is None else metrics:
        values = list(per_q[m].values()) if query_ids is None else [per_q[m][q] for q in query_ids]
        if not values:
            raise ValueError("qrels has no query with a relevant document (relevance > 0)")
        out[m] = math.fsum(values) / len(values)
    return out


def per_query(run: RunLike, qrels: Qrels,
              metrics: Sequence[str] = ("ndcg@10", "mrr@10", "recall@100"),
              ) -> dict[str, dict[str, float]]:
    """Like `evaluate`, but return `{metric name: {qid: value}}` (no averaging)."""
    if isinstance(metrics, str):
        raise TypeError(f"metrics must be a sequence of names, got the string {metrics!r}")
    specs = [_parse(m) for m in metrics]
    if not specs:
        raise ValueError("metrics is empty")
    if not isinstance(qrels, Mapping):
        raise TypeError(f"qrels must be a mapping qid -> {{doc_id: relevance}}, "
                        f"got {type(qrels).__name__}")
    depth = max((k for _, k in specs), default=0)
    ranked = _ranked(run, depth)
    out: dict[str, dict[str, float]] = {m: {} for m in metrics}
    for qid, rels in qrels.items():
        if not any(r > 0 for r in rels.values()):
            continue
        values = _score_query(ranked.get(str(qid), []), rels, specs)
        for m, v in zip(metrics, values):
            out[m][qid] = v
    return out


def check_metric_name(name) -> str:
    """`name` if it is a metric `evaluate` computes ('<metric>@<k>'); else ValueError."""
    _parse(name)
    return name


def _parse(name: str) -> tuple[str, int]:
    match = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"unknown metric {name!r}: want '<metric>@<k>' with metric in "
                         f"{METRICS} and k a positive integer, e.g. 'ndcg@10'")
    return match.group(1), int(match.group(2))


def _ranked(run: RunLike, depth: int) -> dict[str, list[str]]:
    """The top-`depth` doc ids of each query, in rank order."""
    if isinstance(run, tuple):
        if len(run) != 3:
            raise ValueError(f"a tuple run must be (I, query_ids, doc_ids), got {len(run)} items")
        I, query_ids, doc_ids = np.asarray(run[0]), run[1], run[2]
        _check_topk(I, query_ids, doc_ids)
        out = {}
        for qid, rows in zip(query_ids, I.tolist()):
            # dict.fromkeys drops repeats, keeping the first (best) rank.
            out[str(qid)] = list(dict.fromkeys(doc_ids[r] for r in rows if r >= 0))[:depth]
        return out
    if not isinstance(run, Mapping):
        raise TypeError(f"run must be a {{qid: {{doc_id: score}}}} mapping or an "
                        f"(I, query_ids, doc_ids) tuple, got {type(run).__name__}")
    # trec_eval order: score descending, then doc id descending.
    return {str(qid): [d for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]),
                                            reverse=True)[:depth]]
            for qid, docs in run.items()}


def _score_query(ranking: list[str], rels: Mapping[str, int],
                 specs: list[tuple[str, int]]) -> list[float]:
    gains = [max(rels.get(d, 0), 0) for d in ranking]
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)
    n_rel = len(ideal)
    values = []
    for metric, k in specs:
        top = gains[:k]
        hits = [i for i, g in enumerate(top) if g > 0]  # 0-based ranks of relevant docs
        if metric == "ndcg":
            dcg = sum(top[i] / math.log2(i + 2) for i in hits)
            idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
            values.append(dcg / idcg)
        elif metric == "mrr":
            values.append(1.0 / (hits[0] + 1) if hits else 0.0)
        elif metric == "recall":
            values.append(len(hits) / n_rel)
        elif metric == "precision":
            values.append(len(hits) / k)
        else:  # map: P@rank at each relevant rank, summed, over |relevant|
            values.append(sum((j + 1) / (i + 1) for j, i in enumerate(hits)) / n_rel)
    return values


def _check_topk(I: np.ndarray, query_ids: Sequence[str], doc_ids: Sequence[str]) -> None:
    if I.ndim != 2:
        raise ValueError(f"I must have shape (nq, k), got shape {I.shape}")
    if not np.issubdtype(I.dtype, np.integer):
        raise TypeError(f"I must have an integer dtype, got {I.dtype}")
    if len(query_ids) != I.shape[0]:
        raise ValueError(f"query_ids has {len(query_ids)} ids but I has {I.shape[0]} rows")
    if I.size and (I.max() >= len(doc_ids) or I.min() < -1):
        raise ValueError(f"I holds row positions outside [-1, {len(doc_ids)}) "
                         f"(len(doc_ids)={len(doc_ids)})")


def paired_bootstrap(a: Mapping[str, float], b: Mapping[str, float], resamples: int = 2000,
                     rng: np.random.Generator | int = 0) -> dict:
    """Mean of a - b over the same queries and its 95% percentile bootstrap interval.

    Args:
        a, b: {query id: value} of one metric for two systems (e.g. one entry of `per_query`), over
            the same query ids.
        resamples: bootstrap resamplings of the queries (paired: both systems resampled together).
        rng: a NumPy Generator or a seed.

    Returns:
        {"difference": mean(a - b), "ci95": [low, high], "queries": n, "resamples": resamples}: an
        interval that holds 0 is no measured difference.
    """
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"a and b must score the same queries; {len(only)} differ, e.g. {only[:3]}")
    if not a:
        raise ValueError("a and b hold no query")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an int >= 1, got {resamples!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    qids = sorted(a)
    diff = np.array([a[q] - b[q] for q in qids], dtype=np.float64)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(1)
    return {"difference": float(diff.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "queries": len(diff), "resamples": resamples}
