"""Tests for jpq.metrics: hand-computed cases (arithmetic in comments) and a check against ranx."""
import math

import numpy as np
import pytest

from jpq.metrics import evaluate, per_query, run_from_topk

LOG2_3 = math.log2(3)  # discount at rank 2


def approx(x):
    return pytest.approx(x, abs=1e-12)


def test_binary_relevance():
    # Relevant docs a, c (rel 1); ranking a, b, c, d -> relevant at ranks 1 and 3.
    qrels = {"q": {"a": 1, "c": 1}}
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.5}}
    m = evaluate(run, qrels, ["ndcg@10", "ndcg@2", "mrr@10", "recall@2", "recall@3",
                              "precision@2", "precision@10", "map@10", "map@2"])
    # DCG = 1/log2(2) + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3)
    assert m["ndcg@10"] == approx(1.5 / (1 + 1 / LOG2_3))
    # top 2: DCG = 1; IDCG@2 = 1 + 1/log2(3)
    assert m["ndcg@2"] == approx(1 / (1 + 1 / LOG2_3))
    assert m["mrr@10"] == approx(1.0)
    assert m["recall@2"] == approx(1 / 2) and m["recall@3"] == approx(1.0)
    # P@k divides by k even when fewer than k docs are retrieved: 2 / 10
    assert m["precision@2"] == approx(1 / 2) and m["precision@10"] == approx(0.2)
    # AP@10 = (P@1 + P@3) / |rel| = (1 + 2/3) / 2; AP@2 = P@1 / |rel| = 1 / 2
    assert m["map@10"] == approx((1 + 2 / 3) / 2) and m["map@2"] == approx(0.5)


def test_graded_relevance():
    # rels a=1, b=2, c=3, z=0; ranking a, b, x, c, z.
    qrels = {"q": {"a": 1, "b": 2, "c": 3, "z": 0}}
    run = {"q": {"a": 5.0, "b": 4.0, "x": 3.0, "c": 2.0, "z": 1.0}}
    m = evaluate(run, qrels, ["ndcg@3", "ndcg@5", "recall@3", "mrr@1"])
    # Linear gain (trec_eval): DCG@3 = 1/1 + 2/log2(3) + 0; IDCG@3 = 3/1 + 2/log2(3) + 1/2
    assert m["ndcg@3"] == approx((1 + 2 / LOG2_3) / (3 + 2 / LOG2_3 + 0.5))
    # DCG@5 adds c at rank 4: 3/log2(5); z (rel 0) adds nothing; IDCG@5 = IDCG@3
    assert m["ndcg@5"] == approx((1 + 2 / LOG2_3 + 3 / math.log2(5)) / (3 + 2 / LOG2_3 + 0.5))
    # |relevant| = 3 (z has rel 0): a, b in top 3 -> 2/3
    assert m["recall@3"] == approx(2 / 3)
    assert m["mrr@1"] == approx(1.0)


def test_zero_and_negative_relevance_are_not_relevant():
    # z (rel 0) at rank 1, n (rel -1) at rank 2, a (rel 1) at rank 3 -> MRR = 1/3.
    qrels = {"q": {"z": 0, "n": -1, "a": 1}}
    run = {"q": {"z": 3.0, "n": 2.0, "a": 1.0}}
    m = evaluate(run, qrels, ["mrr@10", "ndcg@10", "recall@2"])
    assert m["mrr@10"] == approx(1 / 3)
    assert m["ndcg@10"] == approx((1 / 2) / 1)  # DCG = 1/log2(4); IDCG = 1
    assert m["recall@2"] == approx(0.0)


def test_missing_and_extra_queries():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}  # q3 has nothing relevant
    run = {"q1": {"a": 1.0}, "q4": {"b": 1.0}}  # q2 missing, q4 not judged
    # mean over q1 (1.0) and q2 (0.0, missing from the run); q3 and q4 are ignored
    assert evaluate(run, qrels, ["ndcg@10", "mrr@10"]) == {"ndcg@10": approx(0.5),
                                                         "mrr@10": approx(0.5)}
    assert per_query(run, qrels, ["recall@10"]) == {"recall@10": {"q1": 1.0, "q2": 0.0}}
    with pytest.raises(ValueError, match="no query with a relevant"):
        evaluate(run, {"q3": {"c": 0}})


def test_ties_break_by_doc_id_descending():
    # Equal scores: trec_eval ranks by doc id descending -> c, b, a.
    run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0}}
    assert evaluate(run, {"q": {"a": 1}}, ["mrr@10"])["mrr@10"] == approx(1 / 3)
    assert evaluate(run, {"q": {"c": 1}}, ["mrr@10"])["mrr@10"] == approx(1.0)
    # A higher score beats the tie-break: the top 2 becomes d0, c.
    run["q"]["d0"] = 2.0
    assert evaluate(run, {"q": {"c": 1}}, ["recall@2"])["recall@2"] == approx(1.0)
    assert evaluate(run, {"q": {"b": 1}}, ["recall@2"])["recall@2"] == approx(0.0)


def test_topk_arrays_with_padding():
    doc_ids = ["a", "b", "c", "d"]
    query_ids = ["q1", "q2", "q3"]
    I = np.array([[2, 0, -1], [-1, -1, -1], [3, 3, 1]], dtype=np.int64)
    D = np.array([[0.9, 0.5, 0.0], [0.0, 0.0, 0.0], [0.8, 0.8, 0.1]], dtype=np.float32)
    run = run_from_topk(I, D, query_ids, doc_ids)
    # -1 padding dropped; a repeated doc keeps its first (best) score
    assert run == {"q1": {"c": pytest.approx(0.9), "a": 0.5}, "q2": {},
                   "q3": {"d": pytest.approx(0.8), "b": pytest.approx(0.1)}}
    qrels = {"q1": {"a": 1}, "q2": {"a": 1}, "q3": {"b": 1}}
    # q1: a at rank 2 -> 1/2; q2: nothing retrieved -> 0; q3: d, b -> b at rank 2 -> 1/2
    expected = {"q1": 0.5, "q2": 0.0, "q3": 0.5}
    assert per_query(run, qrels, ["mrr@10"])["mrr@10"] == expected
    # The (I, query_ids, doc_ids) form ranks by row order and drops the repeat the same way.
    assert per_query((I, query_ids, doc_ids), qrels, ["mrr@10"])["mrr@10"] == expected


def test_topk_validation():
    I = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="D must have the shape"):
        run_from_topk(I, np.zeros((2, 2)), ["q1", "q2"], ["a"])
    with pytest.raises(ValueError, match="query_ids"):
        run_from_topk(I, np.zeros((2, 3)), ["q1"], ["a"])
    with pytest.raises(ValueError, match="outside"):
        run_from_topk(I + 1, np.zeros((2, 3)), ["q1", "q2"], ["a"])
    with pytest.raises(TypeError, match="integer"):
        run_from_topk(I.astype(np.float32), np.zeros((2, 3)), ["q1", "q2"], ["a"])
    with pytest.raises(ValueError, match=r"shape \(nq, k\)"):
        evaluate((np.zeros(3, dtype=np.int64), ["q"], ["a"]), {"q": {"a": 1}})
    with pytest.raises(TypeError, match="run"):
        evaluate([("q", "a")], {"q": {"a": 1}})


@pytest.mark.parametrize("name", ["foo@10", "ndcg", "ndcg@0", "ndcg@x", "recall@-1", "mrr@10@2"])
def test_unknown_metric(name):
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate({"q": {"a": 1.0}}, {"q": {"a": 1}}, [name])


def test_metric_names():
    m = evaluate({"q": {"a": 1.0}}, {"q": {"a": 1}}, ["NDCG@10", "precision@1", "map@1000"])
    assert m == {"NDCG@10": 1.0, "precision@1": 1.0, "map@1000": 1.0}
    with pytest.raises(TypeError, match="metrics"):
        evaluate({"q": {"a": 1.0}}, {"q": {"a": 1}}, "ndcg@10")
    with pytest.raises(ValueError, match="empty"):
        evaluate({"q": {"a": 1.0}}, {"q": {"a": 1}}, [])


# ranx 0.3.21 warns about a uint64 -> int64 cast inside its numba kernels; not ours.
@pytest.mark.filterwarnings("ignore:::ranx")
def test_matches_ranx():
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(0)
    pool = [f"d{i}" for i in range(200)]
    qrels, run = {}, {}
    for q in range(50):
        qid = f"q{q}"
        judged = rng.choice(pool, size=int(rng.integers(1, 9)), replace=False)
        rels = rng.integers(0, 4, size=len(judged))  # graded 0..3, 0 = judged non-relevant
        rels[0] = max(rels[0], 1)  # every query has a relevant document
        qrels[qid] = {str(d): int(r) for d, r in zip(judged, rels)}
        # Retrieve 20..150 docs with distinct scores (ranx's order of ties is unspecified),
        # mixing in the judged ones so hits are frequent.
        retrieved = set(rng.choice(pool, size=int(rng.integers(20, 151)), replace=False))
        retrieved |= {str(d) for d in judged if rng.random() < 0.6}
        scores = rng.permutation(len(retrieved)) / 7.0
        run[qid] = {str(d): float(s) for d, s in zip(sorted(retrieved), scores)}
    metrics = ["ndcg@10", "ndcg@3", "ndcg@100", "mrr@10", "mrr@1", "recall@100", "recall@5",
               "map@10", "map@100", "precision@5", "precision@20"]
    ours = per_query(run, qrels, metrics)
    r_qrels, r_run = ranx.Qrels(qrels), ranx.Run(run)
    means = ranx.evaluate(r_qrels, r_run, metrics)
    for m in metrics:
        theirs = r_run.scores[m]
        assert set(theirs) == set(ours[m])
        for qid, value in ours[m].items():
            assert value == pytest.approx(theirs[qid], abs=1e-6), (m, qid)
        assert evaluate(run, qrels, [m])[m] == pytest.approx(means[m], abs=1e-6), m


def test_mean_over_queries_is_evaluate_on_a_subset():
    from jpq.metrics import mean_over_queries, per_query

    rng = np.random.default_rng(3)
    I = np.stack([rng.permutation(30)[:10] for _ in range(6)])
    qids, docs = [f"q{i}" for i in range(6)], [f"d{j}" for j in range(30)]
    qrels = {q: {f"d{j}": int(rng.integers(1, 3)) for j in rng.choice(30, 3, replace=False)} for q in qids}
    names = ("ndcg@10", "recall@10", "mrr@10")
    per_q = per_query((I, qids, docs), qrels, names)
    assert mean_over_queries(per_q) == evaluate((I, qids, docs), qrels, names)
    subset = ["q1", "q4", "q5"]
    assert mean_over_queries(per_q, subset, ("recall@10",)) == evaluate(
        (I[[1, 4, 5]], subset, docs), {q: qrels[q] for q in subset}, ("recall@10",))
    with pytest.raises(ValueError, match="no query"):
        mean_over_queries(per_q, [])


def test_paired_bootstrap():
    from jpq.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    a = {f"q{i}": float(v) for i, v in enumerate(rng.random(400))}
    # a constant shift: the paired interval is exactly the shift
    r = paired_bootstrap({q: v + 0.05 for q, v in a.items()}, a, resamples=300, rng=1)
    np.testing.assert_allclose([r["difference"], *r["ci95"]], 0.05, atol=1e-12)
    assert r["queries"] == 400 and r["resamples"] == 300
    # noisy per-query differences: the interval matches the normal one (mean +- 1.96 SE) and holds the mean
    noise = rng.normal(0.02, 0.2, 400)
    b = {q: v + d for (q, v), d in zip(a.items(), noise)}
    r = paired_bootstrap(b, a, resamples=4000, rng=2)
    se = noise.std(ddof=1) / np.sqrt(len(noise))
    assert r["difference"] == pytest.approx(noise.mean())
    assert r["ci95"][0] < r["difference"] < r["ci95"][1]
    np.testing.assert_allclose(r["ci95"], [noise.mean() - 1.96 * se, noise.mean() + 1.96 * se], atol=0.25 * se)
    # deterministic for a seed; the order of the keys does not matter
    assert paired_bootstrap(b, a, resamples=100, rng=5) == paired_bootstrap(dict(reversed(b.items())), a,
                                                                            resamples=100, rng=5)
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap(a, {"other": 0.0})
    with pytest.raises(ValueError, match="no query"):
        paired_bootstrap({}, {})
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(a, a, resamples=0)
