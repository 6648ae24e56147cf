"""jpq.tree: routing gradients (finite differences), beam search vs exhaustive ADC, training on
synthetic clusters, checkpoint/resume, save/load, bad inputs. Small sizes: the file runs in
well under a minute on the 2-core dev CPU."""
import math

import numpy as np
import pytest
import torch

from jpq.kernels.adc import adc_scores_reference, build_lut_reference
from jpq.tree import (ResidualLinear, TreeConfig, TreeIndex, TreeTrainer, beam_search, default_branching,
                      default_pq_m, leaf_log_probs)
from tolerances import assert_close, assert_equal


def clustered(rng, n_clusters, per_cluster, d, noise=0.15):
    centers = rng.standard_normal((n_clusters, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    x = centers[labels] + noise * rng.standard_normal((len(labels), d)) / math.sqrt(d)
    return x.astype(np.float32), labels, centers.astype(np.float32)


@pytest.fixture(scope="module")
def small_tree():
    """N=613 (awkward), d=24, M=6 (ds=4), nbits=6, branching (3, 5) = 15 leaves."""
    rng = np.random.default_rng(0)
    x, _, _ = clustered(rng, 12, 51, 24, noise=0.6)
    x = np.concatenate([x, rng.standard_normal((1, 24)).astype(np.float32)])
    index = TreeIndex(24, (3, 5), M=6, nbits=6, metric="ip")
    index.train(x, niter=8)
    index.add(x)
    q = rng.standard_normal((9, 24)).astype(np.float32)
    return index, x, q


# --------------------------------------------------------------------------- routing
def tiny_params(rng, d=5, branching=(3, 2), dtype=torch.float64):
    n_l = np.cumprod(branching)
    emb = [torch.tensor(rng.standard_normal((n, d)), dtype=dtype, requires_grad=True) for n in n_l]
    bia = [torch.tensor(rng.standard_normal(n), dtype=dtype, requires_grad=True) for n in n_l]
    ls = torch.tensor([0.3, -0.2][: len(branching)], dtype=dtype, requires_grad=True)
    return emb, bia, ls


def test_leaf_log_probs_matches_loop_form_and_normalises():
    rng = np.random.default_rng(1)
    branching = (3, 2)
    emb, bia, ls = tiny_params(rng, branching=branching)
    x = torch.tensor(rng.standard_normal((4, 5)))
    out = leaf_log_probs(x, emb, bia, ls, branching).detach().numpy()
    ref = np.zeros((4, 6))
    for leaf in range(6):
        j0, j1 = divmod(leaf, 2)
        for i in range(4):
            z0 = (x[i] @ emb[0].T + bia[0]).detach().numpy() * math.exp(ls[0].item())
            z1 = (x[i] @ emb[1].T + bia[1]).detach().numpy() * math.exp(ls[1].item())
            sib = z1[2 * j0 : 2 * j0 + 2]
            ref[i, leaf] = (z0[j0] - np.log(np.exp(z0).sum())) + (z1[leaf] - np.log(np.exp(sib).sum()))
    assert_close(out, ref, reduction_length=5, dtype=np.float64)
    assert_close(np.log(np.exp(out).sum(1)), np.zeros(4), reduction_length=6, dtype=np.float64)


def test_routing_gradients_nonzero_and_match_finite_differences():
    """d(routing loss)/d(everything) against central differences, float64, tree (3, 2)."""
    rng = np.random.default_rng(2)
    branching = (3, 2)
    emb, bia, ls = tiny_params(rng, branching=branching)
    x = torch.tensor(rng.standard_normal((4, 5)), requires_grad=True)
    target = torch.tensor([0, 3, 5, 2])

    def routing_loss(x, e0, e1, c0, c1, ls):
        lp = leaf_log_probs(x, [e0, e1], [c0, c1], ls, branching)
        return -lp.gather(1, target[:, None]).mean()

    inputs = (x, *emb, *bia, ls)
    assert torch.autograd.gradcheck(routing_loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    loss = routing_loss(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    for name, g in zip(("x", "e0", "e1", "c0", "c1", "log_scales"), grads):
        assert g.abs().max() > 1e-6, f"zero gradient for {name}"


def test_trainer_step_moves_nodes_and_tower():
    """The losses of a TreeTrainer step reach node embeddings, biases, scales and the tower."""
    rng = np.random.default_rng(3)
    x, labels, centers = clustered(rng, 8, 20, 16)
    index = TreeIndex(16, (2, 4), M=4, nbits=4)
    index.train(x, niter=5)
    index.add(x)
    ids = [f"q{i}" for i in range(24)]
    q = {f"q{i}": centers[i % 8] for i in range(24)}
    qrels = {f"q{i}": {int(np.nonzero(labels == i % 8)[0][0]): 1} for i in range(24)}
    tr = TreeTrainer(TreeConfig(epochs=1, val_fraction=0.0), index, x, ids, qrels, query_embeddings=q,
                     progress=False)
    before = [p.detach().clone() for p in tr.router.parameters()] + [tr.query_tower.weight.detach().clone()]
    tr.step(ids[:8], np.arange(10), tr._snapshot(with_queries=False))
    after = list(tr.router.parameters()) + [tr.query_tower.weight]
    for b, a in zip(before, after):
        assert not torch.equal(b, a.detach())


# --------------------------------------------------------------------------- search
def test_full_beam_equals_exhaustive_pq_search(small_tree):
    """A beam covering every leaf scores every document: same ids and scores as PQIndex.search."""
    index, x, q = small_tree
    for k in (1, 10, 700):  # 700 > N: -1 padding like faiss
        D_ref, I_ref = index.pq.search(q, k)
        for beam in (index.n_leaves, index.n_leaves + 3):
            D, I = index.search(q, k, beam=beam)
            assert_equal(I, I_ref)
            assert_equal(D, D_ref)
    # torch in, torch out; and a stored query tower is applied before routing and scoring
    D, I = index.search(torch.from_numpy(q), 5, beam=99)
    assert isinstance(I, torch.Tensor) and I.dtype == torch.int64
    A = np.eye(24, dtype=np.float32) + 0.1 * np.random.default_rng(4).standard_normal((24, 24)).astype(np.float32)
    index.query_matrix = A
    try:
        D, I = index.search(q, 10, beam=index.n_leaves)
        D_ref, I_ref = index.pq.search(q @ A.T, 10)
        assert_equal(I, I_ref)
        assert_equal(D, D_ref)
    finally:
        index.query_matrix = None


def test_single_query_equals_exhaustive_pq_search(small_tree):
    """PQIndex takes its few-query scans for 1-12 queries (reassociated sums): same ids, scores
    to float32 rounding."""
    index, x, q = small_tree
    for i in range(3):
        D_ref, I_ref = index.pq.search(q[i : i + 1], 10)
        D, I = index.search(q[i : i + 1], 10, beam=index.n_leaves)
        assert_equal(I, I_ref)
        assert_close(D, D_ref, reduction_length=index.M)



@pytest.mark.interpreter
def test_device_scan_matches_the_cpu_scan(small_tree):
    """backend="triton" with torch queries (a CUDA device, or here the CPU interpreter): routing on
    the CPU, the scan by ivf_search's Triton path against cached copies of the lists; same ids
    as the CPU scan at every beam, scores within float32 rounding, torch out on q's device."""
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    index, x, q = small_tree
    qt = torch.from_numpy(q)
    try:
        for beam in (1, 3, index.n_leaves):
            D_cpu, I_cpu = index.search(q, 12, beam=beam, backend="cpu")
            D, I = index.search(qt, 12, beam=beam, backend="triton")
            assert isinstance(D, torch.Tensor) and I.dtype == torch.int64 and D.device == qt.device
            assert_equal(I.numpy(), I_cpu)
            assert_close(D.numpy(), D_cpu, reduction_length=index.M)
        copies = index._device_cache[2]
        index.search(qt, 5, beam=2, backend="triton")
        assert index._device_cache[2] is copies  # reused while the index is unchanged
        index.drop_device_copies()
        assert index._device_cache is None
    finally:
        index.drop_device_copies()
    with pytest.raises(ValueError, match="backend"):
        index.search(q, 5, beam=2, backend="gpu")

@pytest.mark.parametrize("kmeans_metric", ["l2", "ip"])
def test_step_zero_is_a_plain_ivf_tree(kmeans_metric):
    """At step 0 each document sits under its best centroid at every level (nearest in L2, or
    largest inner product), whatever the routing temperature."""
    rng = np.random.default_rng(8)
    x, _, _ = clustered(rng, 10, 40, 16, noise=0.8)
    for scale in (1.0, 20.0):
        index = TreeIndex(16, (3, 4), M=4, nbits=4, init_scale=scale, kmeans_metric=kmeans_metric)
        index.train(x, niter=6)
        index.add(x)
        C0, C1 = index.embeddings

        def best(v, C):
            return (v @ C.T).argmax(1) if kmeans_metric == "ip" else ((v[:, None] - C[None]) ** 2).sum(-1).argmin(1)
        top = best(x, C0)
        child = np.array([best(x[i : i + 1], C1[4 * t : 4 * t + 4])[0] for i, t in enumerate(top)])
        assert_equal(index.leaf_of, 4 * top + child)


def test_narrow_beam_scores_only_reached_leaves(small_tree):
    index, x, q = small_tree
    lut = build_lut_reference(q, index.pq.centroids, "ip")
    scores = adc_scores_reference(lut, index.pq.codes)
    for beam in (1, 2, 4):
        leaves, _ = index.probe(q, beam)
        D, I = index.search(q, 20, beam=beam)
        for i in range(len(q)):
            allowed = np.nonzero(np.isin(index.leaf_of, leaves[i]))[0]
            got = I[i][I[i] >= 0]
            assert np.isin(got, allowed).all()
            assert len(got) == min(20, len(allowed))
            assert_close(D[i][: len(got)], scores[i, got], reduction_length=index.M)
            best = np.sort(scores[i, allowed])[::-1][: len(got)]  # the best of the reached documents
            assert_close(D[i][: len(got)], best, reduction_length=index.M)
        frac = np.mean([np.isin(index.leaf_of, leaves[i]).sum() for i in range(len(q))]) / index.ntotal
        assert index.fraction_scored(q, beam) == pytest.approx(frac)
    assert index.fraction_scored(q, index.n_leaves) == pytest.approx(1.0)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_centroid_share_fills_the_beam_with_the_best_centroid_leaves(metric, tmp_path):
    """probe with a centroid share: the routing's first w - floor(share * w) leaves, then the
    other non-empty leaves with the best centroid score (the mean reconstruction of the leaf's
    documents), no leaf twice, scores = path log-probabilities; a full beam still equals
    exhaustive search; the share is saved."""
    from jpq.tree import leaf_log_probs

    rng = np.random.default_rng(5)
    x, _, _ = clustered(rng, 12, 40, 16, noise=0.7)
    index = TreeIndex(16, (3, 4), M=4, nbits=5, metric=metric)
    index.train(x, niter=6)
    index.add(x[:300])  # some leaves may stay empty
    q = rng.standard_normal((7, 16)).astype(np.float32)
    sizes = index.leaf_sizes()
    xhat = index.pq.decode(index.pq.codes)
    cent = np.zeros((index.n_leaves, 16))
    for leaf in range(index.n_leaves):
        if sizes[leaf]:
            cent[leaf] = xhat[index.leaf_of == leaf].mean(0)
    assert_close(index.leaf_centroids(), cent.astype(np.float32), reduction_length=300)
    cscore = q @ cent.T if metric == "ip" else -((q[:, None] - cent[None]) ** 2).sum(-1)
    cscore[:, sizes == 0] = -np.inf
    emb, bia, ls = index.routing_params()
    logp = leaf_log_probs(torch.from_numpy(q), emb, bia, ls, index.branching).numpy()
    for share in (0.25, 0.5, 0.9):
        for beam in (1, 2, 4, 7):
            routed, rscore = index.probe(q, beam, centroid_share=0.0)
            leaves, score = index.probe(q, beam, centroid_share=share)
            w = routed.shape[1]
            n_learn = w - int(share * w)
            for i in range(len(q)):
                ok = np.isfinite(score[i])
                got = leaves[i][ok]
                assert len(set(got.tolist())) == len(got) and (sizes[got] > 0).all()
                head = routed[i][:n_learn][np.isfinite(rscore[i][:n_learn])]
                assert_equal(got[: len(head)], head)
                rest = [l for l in np.argsort(-cscore[i], kind="stable") if l not in head and sizes[l] > 0]
                assert_equal(got[len(head):], np.array(rest[: len(got) - len(head)], dtype=np.int64))
                assert len(got) == min(w, int((sizes > 0).sum()))
                assert_close(score[i][ok], logp[i, got], reduction_length=16)
    index.centroid_share = 0.5
    try:
        for k in (5, 50):  # a beam over every leaf still scores every document
            D_ref, I_ref = index.pq.search(q, k)
            D, I = index.search(q, k, beam=index.n_leaves)
            assert_equal(I, I_ref)
            assert_equal(D, D_ref)
        D0, I0 = index.search(q, 10, beam=3)
        path = tmp_path / "t.jpq"
        index.save(path)
        loaded = TreeIndex.load(path)
        assert loaded.centroid_share == 0.5
        D1, I1 = loaded.search(q, 10, beam=3)
        assert_equal(I1, I0)
        assert_equal(D1, D0)
    finally:
        index.centroid_share = 0.0
    with pytest.raises(ValueError, match="centroid_share"):
        index.probe(q, 2, centroid_share=1.0)
    with pytest.raises(ValueError, match="centroid_share"):
        index.centroid_share = 1.5
    with pytest.raises(TypeError, match="centroid_share"):
        TreeIndex(16, (2, 2), M=4, centroid_share="half")
    with pytest.raises(ValueError, match="centroid_share"):
        TreeConfig(centroid_share=-0.1)


def test_beam_search_keeps_the_best_paths_and_skips_empty_leaves():
    rng = np.random.default_rng(5)
    emb, bia, ls = tiny_params(rng, d=6, branching=(4, 3), dtype=torch.float32)
    emb, bia, ls = [e.detach() for e in emb], [c.detach() for c in bia], ls.detach()
    x = torch.tensor(rng.standard_normal((7, 6)), dtype=torch.float32)
    full = leaf_log_probs(x, emb, bia, ls, (4, 3))
    leaves, score = beam_search(x, emb, bia, ls, (4, 3), beam=12)
    order = torch.sort(full, dim=1, descending=True, stable=True).indices
    assert_equal(leaves, order)  # beam covering all leaves = every path, best first
    leaves, _ = beam_search(x, emb, bia, ls, (4, 3), beam=1)
    top = full.reshape(7, 4, 3)
    # beam 1 is greedy: best parent, then its best child
    parent = top.logsumexp(-1).argmax(1)
    child = top[torch.arange(7), parent].argmax(1)
    assert_equal(leaves[:, 0], parent * 3 + child)
    counts = [np.array([1, 0, 1, 1]), np.array([1, 0, 0] + [0] * 3 + [1, 0, 0] + [0, 0, 1])]
    leaves, score = beam_search(x, emb, bia, ls, (4, 3), beam=12, node_counts=counts)
    finite = torch.isfinite(score)
    assert (finite.sum(1) == 3).all()
    assert set(leaves[finite].tolist()) == {0, 6, 11}


# --------------------------------------------------------------------------- training
def synthetic_task(seed=6, n_clusters=16, d=16):
    """Documents in 16 tight clusters; a query about cluster c *looks like* cluster pi(c) (a fixed
    permutation: a linear query-side shift), so the k-means tree routes it to the wrong leaf."""
    rng = np.random.default_rng(seed)
    x, labels, centers = clustered(rng, n_clusters, 30, d, noise=0.2)
    pi = rng.permutation(n_clusters)

    def queries(n, prefix):
        c = rng.integers(0, n_clusters, n)
        q = centers[pi[c]] + 0.05 * rng.standard_normal((n, d)).astype(np.float32) / math.sqrt(d)
        ids = [f"{prefix}{i}" for i in range(n)]
        qrels = {i: {int(rng.choice(np.nonzero(labels == cc)[0])): 1} for i, cc in zip(ids, c)}
        return ids, dict(zip(ids, q.astype(np.float32))), qrels

    return x, queries


def routed_to_positive_leaf(index, q, qrels, ids):
    leaves, _ = index.probe(q, beam=1)
    return np.mean([index.leaf_of[next(iter(qrels[i]))] == leaves[j, 0] for j, i in enumerate(ids)])


def test_synthetic_clusters_are_routed_to_the_right_leaves_after_training():
    x, queries = synthetic_task()
    index = TreeIndex(16, (4, 4), M=4, nbits=4)
    index.train(x, niter=10)
    index.add(x)
    train_ids, train_q, train_qrels = queries(320, "t")
    test_ids, test_q, test_qrels = queries(200, "e")
    qt = np.stack([test_q[i] for i in test_ids])
    before = routed_to_positive_leaf(index, qt, test_qrels, test_ids)
    cfg = TreeConfig(epochs=12, patience=12, lr_query=1e-2, val_fractions=(0.1,), negatives=20, docs_per_step=64)
    tr = TreeTrainer(cfg, index, x, train_ids, train_qrels, query_embeddings=train_q, progress=False)
    hist = tr.fit()
    tree = tr.trained_index()
    after = routed_to_positive_leaf(tree, qt, test_qrels, test_ids)
    assert before < 0.3, before
    assert after >= 0.9, (before, after)
    assert hist[tr.state.best_epoch]["val"] >= hist[0]["val"]
    assert tree.leaf_sizes().max() <= 3 * len(x) / tree.n_leaves  # balanced: no collapsed leaf
    assert index.query_matrix is None and tree.query_matrix is not None  # the init is left unchanged


def test_checkpoint_resume_is_deterministic(tmp_path):
    x, queries = synthetic_task(seed=7)
    ids, q, qrels = queries(96, "t")

    def trainer(out):
        index = TreeIndex(16, (2, 4), M=4, nbits=4)
        index.train(x, niter=5, seed=0)
        index.add(x)
        cfg = TreeConfig(epochs=3, patience=3, val_fractions=(0.2,), negatives=10, docs_per_step=32, seed=3)
        return TreeTrainer(cfg, index, x, ids, qrels, query_embeddings=q, out_dir=out, progress=False)

    straight = trainer(tmp_path / "a")
    h_straight = straight.fit()
    part = trainer(tmp_path / "b")
    part.fit(stop_after_epoch=2)
    assert (tmp_path / "b" / "checkpoint.pt").exists() and part.state.epoch == 2
    resumed = trainer(tmp_path / "b")
    h_resumed = resumed.fit(resume=True)
    assert [h["val"] for h in h_resumed] == [h["val"] for h in h_straight]
    a, b = straight.trained_index(), resumed.trained_index()
    for ea, eb in zip(a.embeddings + [a.query_matrix, a.leaf_of], b.embeddings + [b.query_matrix, b.leaf_of]):
        assert_equal(ea, eb)
    assert (tmp_path / "a" / "best.pt").exists()
    with pytest.raises(ValueError, match="different configuration"):
        other = trainer(tmp_path / "a")
        other.cfg.epochs = 4
        other.fit(resume=True)
    # the search-only centroid_share may change on resume: training never reads it
    searched = trainer(tmp_path / "a")
    searched.cfg.centroid_share = 0.25
    assert [h["val"] for h in searched.fit(resume=True)] == [h["val"] for h in h_straight]
    assert searched.trained_index().centroid_share == 0.25


class ToyTextTower(torch.nn.Module):
    """A text encoder stand-in: looks texts up in a table, then a trainable linear map."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.lin = ResidualLinear(next(iter(table.values())).shape[0])

    def forward(self, texts):
        return self.lin(torch.from_numpy(np.stack([self.table[t] for t in texts])))


def test_text_tower_and_document_tower_train_and_stay_consistent():
    """Queries as texts through a module, plus a trainable document projection: the trained
    index holds the PQ codes and leaves of the *projected* documents."""
    x, queries = synthetic_task(seed=9)
    ids, q, qrels = queries(64, "t")
    texts = {i: f"text {i}" for i in ids}
    index = TreeIndex(16, (2, 4), M=4, nbits=4)
    index.train(x, niter=5)
    index.add(x)
    # no held-out queries: every epoch runs and the last one is kept
    cfg = TreeConfig(epochs=2, patience=2, reassign_every=1, val_fraction=0.0, negatives=10, docs_per_step=32)
    tower = ToyTextTower({texts[i]: q[i] for i in ids})
    doc_tower = ResidualLinear(16)
    tr = TreeTrainer(cfg, index, x, ids, qrels, query_texts=texts, query_tower=tower, doc_tower=doc_tower,
                     progress=False)
    hist = tr.fit()
    assert tr.state.best_epoch == 2 and [h["val"] for h in hist] == [None, None, None]
    assert doc_tower.weight.detach().abs().max() > 0  # the document tower was trained
    tree = tr.trained_index()
    assert tree.query_matrix is None  # not a ResidualLinear: the caller encodes queries
    with torch.no_grad():
        xd = doc_tower(torch.from_numpy(x)).numpy()
    assert_equal(tree.pq.codes, tree.pq.encode(xd))
    assert_equal(tree.leaf_of, tree.assign_leaves(xd))
    qv = tr.encode_queries([texts[i] for i in ids[:5]])
    D, I = tree.search(qv, 5, beam=tree.n_leaves)
    D_ref, I_ref = tree.pq.search(qv, 5)
    assert_equal(I, I_ref)


def tiny_beir(seed=10):
    """A BEIR-shaped synthetic dataset: 480 documents in 16 clusters, 160 train + 40 test queries."""
    from jpq.data import BeirDataset

    x, queries = synthetic_task(seed=seed)
    tr_ids, tr_q, tr_rel = queries(160, "t")
    te_ids, te_q, te_rel = queries(40, "e")
    doc_ids = [f"d{i}" for i in range(len(x))]
    qids = tr_ids + te_ids
    qrels = {"train": {q: {doc_ids[d]: r for d, r in rel.items()} for q, rel in tr_rel.items()},
             "test": {q: {doc_ids[d]: r for d, r in rel.items()} for q, rel in te_rel.items()}}
    ds = BeirDataset(doc_ids, ["doc"] * len(x), qids, ["query"] * len(qids), qrels, "tiny", "-")
    return ds, x, np.stack([{**tr_q, **te_q}[q] for q in qids])


def test_demo_and_cli_entry_points(tmp_path):
    import json
    from types import SimpleNamespace

    pytest.importorskip("faiss")
    pytest.importorskip("matplotlib")
    from jpq.tree import run_tree_demo, train_tree_cli

    ds, x, q = tiny_beir()
    cfg = TreeConfig(epochs=2, negatives=10, docs_per_step=32)
    records = run_tree_demo(ds, x, q, tmp_path / "demo", progress=False, config=cfg)
    methods = {r["method"] for r in records}
    assert {"tree", "tree-init", "ivf-flat", "ivf-pq"} <= methods
    for r in records:
        assert {"method", "fraction_target", "fraction_scored", "leaves", "recall@100", "ndcg@10", "mrr@10"} <= set(r)
        assert r["leaves"] == 25 == np.prod(default_branching(len(x))) and 0 < r["fraction_scored"] <= 1
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved == json.loads(json.dumps(records))
    assert (tmp_path / "demo" / "results.png").stat().st_size > 0 and (tmp_path / "demo" / "results.md").exists()
    details = json.loads((tmp_path / "demo" / "results-details.json").read_text())["settings"]
    paired = details["paired_bootstrap"]
    assert {(r["versus"], r["metric"]) for r in paired} == {(v, m) for v in ("ivf-flat", "ivf-pq", "tree-init")
                                                            for m in ("recall@100", "ndcg@10")}
    assert all(r["ci95"][0] <= r["difference"] <= r["ci95"][1] for r in paired)
    assert "bootstrap interval, 2000 resamplings" in (tmp_path / "demo" / "results.md").read_text()
    ws = SimpleNamespace(dataset=ds, doc_emb=x, query_emb=q, train_split="train")
    summary = train_tree_cli(ws, tmp_path / "train", progress=False, config=cfg)
    tree = TreeIndex.load(summary["index"])
    assert tree.ntotal == len(x) and tree.query_matrix is not None


# --------------------------------------------------------------------------- persistence
def test_save_load_round_trip(small_tree, tmp_path):
    index, x, q = small_tree
    index.query_matrix = np.eye(24, dtype=np.float32) * 1.5
    try:
        path = tmp_path / "tree.jpq"
        index.save(path)
        loaded = TreeIndex.load(path)
    finally:
        index.query_matrix = None
    assert loaded.branching == index.branching and loaded.M == index.M and loaded.metric == index.metric
    for a, b in zip(index.embeddings + index.biases + [index.log_scales, index.leaf_of, index.pq.codes,
                    index.pq.centroids], loaded.embeddings + loaded.biases + [loaded.log_scales,
                    loaded.leaf_of, loaded.pq.codes, loaded.pq.centroids]):
        assert_equal(a, b)
    assert_equal(loaded.query_matrix, np.eye(24, dtype=np.float32) * 1.5)
    loaded.query_matrix = None
    for beam in (1, 3):
        D0, I0 = index.search(q, 10, beam)
        D1, I1 = loaded.search(q, 10, beam)
        assert_equal(I1, I0)
        assert_equal(D1, D0)
    blob = path.read_bytes()
    (tmp_path / "bad.jpq").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(ValueError, match="checksum"):
        TreeIndex.load(tmp_path / "bad.jpq")
    (tmp_path / "short.jpq").write_bytes(blob[:-10])
    with pytest.raises(ValueError, match="truncated"):
        TreeIndex.load(tmp_path / "short.jpq")
    index.pq.save(tmp_path / "pq.jpq")
    with pytest.raises(ValueError, match="not a jpq tree"):
        TreeIndex.load(tmp_path / "pq.jpq")


def test_load_rejects_well_formed_files_with_wrong_contents(small_tree, tmp_path):
    """A checksummed tree file whose arrays do not fit its tree (codes >= K, leaves out of range or
    one short, a query matrix of another shape) is refused on load: search trusts them."""
    index, x, q = small_tree
    originals = (index.pq.codes, index.leaf_of, index.query_matrix)
    bad = {"codes values must lie in": ("codes", np.full_like(index.pq.codes, 255)),
           r"leaf_of must hold leaves in \[0, 15\)": ("leaf_of", np.full_like(index.leaf_of, 15)),
           "leaf_of must be an int64 array of shape": ("leaf_of", index.leaf_of[:-1]),
           "query_matrix must be a float32 array of shape": ("query_matrix", np.eye(3, dtype=np.float32))}
    try:
        for message, (name, value) in bad.items():
            index.pq.codes, index.leaf_of, index.query_matrix = originals
            setattr(index.pq if name == "codes" else index, name, value)
            index.save(tmp_path / "bad.jpq")  # save writes what it is given; load checks
            with pytest.raises(ValueError, match=message):
                TreeIndex.load(tmp_path / "bad.jpq")
    finally:
        index.pq.codes, index.leaf_of, index.query_matrix = originals


def test_zero_queries_give_empty_results(small_tree):
    index, x, q = small_tree
    for beam in (1, 4, 15):
        leaves, score = index.probe(q[:0], beam)
        assert leaves.shape == score.shape == (0, min(beam, 15))
        D, I = index.search(q[:0], 5, beam)
        assert D.shape == I.shape == (0, 5) and D.dtype == np.float32 and I.dtype == np.int64
        Dt, It = index.search(torch.from_numpy(q[:0]), 5, beam)
        assert isinstance(Dt, torch.Tensor) and Dt.shape == It.shape == (0, 5)
        assert index.fraction_scored(q[:0], beam) == 0.0


# --------------------------------------------------------------------------- inputs
def test_bad_inputs_raise_clear_errors(small_tree):
    index, x, q = small_tree
    with pytest.raises(TypeError, match="branching"):
        TreeIndex(24, 8)
    with pytest.raises(ValueError, match="branching"):
        TreeIndex(24, (1, 4))
    with pytest.raises(ValueError, match="divisible"):
        TreeIndex(24, (2, 2), M=5)
    with pytest.raises(TypeError, match="d must be an int"):
        TreeIndex(24.0, (2, 2))
    with pytest.raises(ValueError, match="beam must be >= 1"):
        index.search(q, 5, beam=0)
    with pytest.raises(TypeError, match="beam must be an int"):
        index.search(q, 5, beam=2.5)
    with pytest.raises(ValueError, match="shape"):
        index.search(q[:, :20], 5, beam=2)
    with pytest.raises(TypeError, match="floating"):
        index.search(q.astype(np.int64), 5, beam=2)
    with pytest.raises(TypeError, match="k must be an int"):
        index.search(q, "5", beam=2)
    with pytest.raises(RuntimeError, match="not trained"):
        TreeIndex(24, (2, 2), M=6).search(q, 5, beam=1)
    with pytest.raises(ValueError, match="at least"):
        TreeIndex(24, (2, 2), M=6).train(x[:10])
    with pytest.raises(ValueError, match="epochs"):
        TreeConfig(epochs=0)
    with pytest.raises(ValueError, match="train_fraction"):
        TreeConfig(train_fraction=0.0)
    for bad, error, message in [({"epochs": 2.5}, TypeError, "epochs must be an int"),
                                ({"lr_query": -1e-3}, ValueError, "lr_query must be a finite number >= 0"),
                                ({"scale": float("nan")}, ValueError, "scale must be a finite number > 0"),
                                ({"threads": 0}, ValueError, "threads must be >= 1"),
                                ({"refit": "yes"}, TypeError, "refit must be True or False")]:
        with pytest.raises(error, match=message):
            TreeConfig(**bad)
    ids = ["a"]
    with pytest.raises(ValueError, match="rows"):
        TreeTrainer(TreeConfig(), index, x[:-1], ids, {"a": {0: 1}}, query_embeddings={"a": q[0]})
    with pytest.raises(ValueError, match="exactly one"):
        TreeTrainer(TreeConfig(), index, x, ids, {"a": {0: 1}})
    with pytest.raises(ValueError, match="outside"):
        TreeTrainer(TreeConfig(), index, x, ids, {"a": {10**6: 1}}, query_embeddings={"a": q[0]})
    with pytest.raises(TypeError, match="TreeConfig"):
        TreeTrainer({"epochs": 1}, index, x, ids, {"a": {0: 1}}, query_embeddings={"a": q[0]})
    with pytest.raises(ValueError, match="nothing left to train on"):  # one query, and it is held out
        TreeTrainer(TreeConfig(val_fraction=0.9), index, x, ids, {"a": {0: 1}}, query_embeddings={"a": q[0]})


def test_size_rules():
    assert default_branching(5183) == (8, 8)
    assert default_branching(8_841_823) == (55, 55)
    assert default_branching(10) == (2, 2)
    assert default_pq_m(384) == 96 and default_pq_m(768) == 192 and default_pq_m(30) == 15
    tower = ResidualLinear(4)
    x = torch.randn(3, 4)
    assert torch.equal(tower(x), x)  # identity at step 0


def test_paired_bootstrap_intervals():
    from jpq.tree import _paired_bootstrap

    rng = np.random.default_rng(0)
    base = {f"q{i}": float(v) for i, v in enumerate(rng.random(200))}
    better = {q: v + 0.1 for q, v in base.items()}
    runs = {"same": {"recall@100": base}, "better": {"recall@100": better}, "base": {"recall@100": base}}
    for tree, lo_sign in (("same", 0), ("better", 1)):
        chosen = {("tree", 0.1): runs[tree], ("base", 0.1): runs["base"]}
        (r,) = _paired_bootstrap(chosen, [0.1], ["base"], ("recall@100",), seed=1, resamples=500)
        if lo_sign == 0:  # identical runs: no difference, a zero-width interval
            assert r["difference"] == 0 and r["ci95"] == [0.0, 0.0]
        else:  # every query +0.1: the paired interval is exactly +0.1, well away from 0
            np.testing.assert_allclose([r["difference"], *r["ci95"]], 0.1, atol=1e-9)
        assert r["queries"] == 200 and r["versus"] == "base" and r["metric"] == "recall@100"
        assert r["resamples"] == 500


# --------------------------------------------------------------------------- ids
def tree_with_ids(small_tree, ids, rows=None):
    """The small tree's routing and codebooks, its documents (those at `rows`) added under `ids`."""
    import copy

    index, x, _ = small_tree
    tree = copy.deepcopy(index)
    tree.reset()
    tree.add_with_ids(x if rows is None else x[rows], ids)
    return tree


def test_add_with_ids_searches_as_positions_mapped_through_the_ids(small_tree):
    index, x, q = small_tree
    ids = np.random.default_rng(5).permutation(len(x)).astype(np.int64) * 1000 + 7
    tree = tree_with_ids(small_tree, ids)
    assert_equal(tree.leaf_of, index.leaf_of)
    assert_equal(tree.ids, ids)
    for beam in (1, 3, tree.n_leaves):
        for k in (10, 700):  # 700 > N: -1 padding kept
            D0, I0 = index.search(q, k, beam)
            D, I = tree.search(q, k, beam)
            assert_equal(D, D0)
            assert_equal(I, np.where(I0 >= 0, ids[np.maximum(I0, 0)], -1))
    D, I = tree.search(torch.from_numpy(q), 5, 2)
    assert isinstance(I, torch.Tensor) and set(I.numpy().ravel()) <= set(ids)
    assert_equal(tree.reconstruct(int(ids[3])), index.pq.decode(index.pq.codes[3:4])[0])
    assert_equal(tree.reconstruct_batch(ids[[4, 1]]), index.pq.decode(index.pq.codes[[4, 1]]))
    with pytest.raises(ValueError, match="mix positions and ids"):
        tree.add(x[:2])
    with pytest.raises(ValueError, match="ids must be >= 0"):
        tree.add_with_ids(x[:2], [1, -1])
    assert tree.ntotal == len(x) and len(tree.leaf_of) == len(x)  # nothing appended by a refused call


@pytest.mark.parametrize("ids_map", [True, False])
def test_remove_ids_keeps_the_tree_and_matches_a_fresh_index(small_tree, ids_map):
    """Removing documents (by id, or by position without ids) leaves the routing and the other
    documents' leaves alone: the same index as one built from the kept documents."""
    import faiss

    _, x, q = small_tree
    keep = np.setdiff1d(np.arange(len(x)), np.arange(len(x))[::4])
    if ids_map:
        ids = np.arange(len(x), dtype=np.int64) * 3 + 1
        tree, fresh = tree_with_ids(small_tree, ids), tree_with_ids(small_tree, ids[keep], keep)
    else:
        ids = np.arange(len(x), dtype=np.int64)
        tree, fresh = tree_with_ids(small_tree, ids), tree_with_ids(small_tree, ids[keep], keep)
        for t, rows in ((tree, ids), (fresh, keep)):  # the same trees without ids
            t.reset()
            t.add(x[rows])
    tree.search(q, 5, 3)  # warm the lists and their leaf-ordered codes: removal must drop them
    tree.leaf_centroids()
    assert tree.remove_ids(ids[::4]) == len(ids[::4])
    assert_equal(tree.leaf_of, fresh.leaf_of)
    assert_equal(tree.pq.codes, fresh.pq.codes)
    for beam in (1, 4, tree.n_leaves):
        for a, b in zip(tree.search(q, 20, beam), fresh.search(q, 20, beam)):
            assert_equal(a, b)
    first = int(tree.ids.min()) if ids_map else 0
    removed = tree.remove_ids(faiss.IDSelectorRange(first, first + 40))
    assert removed > 0 and tree.ntotal == len(keep) - removed == len(tree.leaf_of)
    assert tree.remove_ids([]) == 0


def test_ids_save_load_and_training_by_rows(small_tree, tmp_path):
    """ids survive save / load; a TreeTrainer given an index with ids validates by rows (the same
    history as without ids) and its trained index searches under the ids."""
    index, x, q = small_tree
    ids = np.random.default_rng(6).permutation(len(x)).astype(np.int64) + 100
    tree = tree_with_ids(small_tree, ids)
    tree.save(tmp_path / "ids.jpq")
    loaded = TreeIndex.load(tmp_path / "ids.jpq")
    assert_equal(loaded.ids, ids)
    for a, b in zip(loaded.search(q, 10, 3), tree.search(q, 10, 3)):
        assert_equal(a, b)
    rng = np.random.default_rng(7)
    qids = [f"q{i}" for i in range(60)]
    qv = {i: (x[j] + 0.3 * rng.standard_normal(24)).astype(np.float32) for i, j in zip(qids, rng.integers(0, len(x), 60))}
    qrels = {i: {int(np.argmax(x @ qv[i])): 1} for i in qids}
    cfg = TreeConfig(epochs=2, patience=2, val_fractions=(0.2,), negatives=8, docs_per_step=32, seed=1)
    plain_tr = TreeTrainer(cfg, index, x, qids, qrels, query_embeddings=qv, progress=False)
    ids_tr = TreeTrainer(cfg, tree, x, qids, qrels, query_embeddings=qv, progress=False)
    assert [h["val"] for h in ids_tr.fit()] == [h["val"] for h in plain_tr.fit()]
    trained_plain, trained_ids = plain_tr.trained_index(), ids_tr.trained_index()
    assert_equal(trained_ids.ids, ids)
    D0, I0 = trained_plain.search(q, 10, 3)
    D, I = trained_ids.search(q, 10, 3)
    assert_equal(D, D0)
    assert_equal(I, np.where(I0 >= 0, ids[np.maximum(I0, 0)], -1))


@pytest.mark.interpreter
def test_device_scan_maps_the_ids_too(small_tree):
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    _, x, q = small_tree
    ids = np.arange(len(x), dtype=np.int64)[::-1] * 5 + 2
    tree = tree_with_ids(small_tree, ids)
    D_cpu, I_cpu = tree.search(q, 12, beam=3, backend="cpu")
    D, I = tree.search(torch.from_numpy(q), 12, beam=3, backend="triton")
    assert_equal(I.numpy(), I_cpu)
    assert_close(D.numpy(), D_cpu, reduction_length=tree.M)


def varied_tree(metric, opq, share, query_matrix, with_ids):
    """A small trained tree of another kind than the fixture's: metric, OPQ, a centroid share,
    a stored query matrix, ids."""
    rng = np.random.default_rng(12)
    x, _, _ = clustered(rng, 10, 40, 24, noise=0.6)
    tree = TreeIndex(24, (3, 4), M=6, nbits=6, metric=metric, opq=opq, centroid_share=share)
    tree.train(x, niter=6)
    ids = np.arange(len(x), dtype=np.int64)[::-1] * 2 + 1
    tree.add_with_ids(x, ids) if with_ids else tree.add(x)
    if query_matrix:
        tree.query_matrix = (np.eye(24) + 0.2 * rng.standard_normal((24, 24))).astype(np.float32)
    q = rng.standard_normal((12, 24)).astype(np.float32)
    return tree, x, q, ids if with_ids else np.arange(len(x), dtype=np.int64)


def brute_force_scores(tree, q):
    """ADC scores of every document for q, through the stored query tower and the rotation."""
    qt = tree.transform_queries(q)
    return adc_scores_reference(build_lut_reference(tree.pq.rotate(qt), tree.pq.centroids, tree.metric),
                                tree.pq.codes)


TREE_KINDS = [("ip", False, 0.0, False, True), ("l2", False, 0.0, False, False), ("ip", True, 0.5, True, True),
              ("l2", True, 0.5, False, True)]


@pytest.mark.parametrize("metric,opq,share,query_matrix,with_ids", TREE_KINDS)
def test_filtered_search_and_range_search_equal_brute_force_in_the_reached_leaves(metric, opq, share,
                                                                                  query_matrix, with_ids):
    """params.sel, as faiss' IVF indexes take it: the leaves of the unfiltered search (routing,
    centroid share), their unselected documents skipped; range_search: every document of the
    reached leaves within the radius. Both against ADC scores of all documents."""
    import faiss
    from jpq.kernels.adc import topk_from_scores

    tree, x, q, ids = varied_tree(metric, opq, share, query_matrix, with_ids)
    scores = brute_force_scores(tree, q)
    better = (lambda s, r: s > r) if metric == "ip" else (lambda s, r: s < r)
    ranked = np.unique(-scores if metric == "ip" else scores)  # best first
    at = int(np.argmax(np.diff(ranked)[len(ranked) // 10 :] > 1e-3)) + len(ranked) // 10
    r = float(ranked[at] + ranked[at + 1]) / 2  # about the best tenth, in a gap between scores
    r = -r if metric == "ip" else r
    rng = np.random.default_rng(13)
    chosen = np.sort(rng.choice(len(x), 150, replace=False))
    for sel, rows in [(None, np.arange(len(x))), (faiss.IDSelectorBatch(ids[chosen]), chosen),
                      (faiss.IDSelectorRange(-3, -2), np.zeros(0, np.int64))]:
        params = None if sel is None else faiss.SearchParameters(sel=sel)
        for beam in (1, 3, tree.n_leaves):
            leaves, leaf_scores = tree.probe(q, beam)
            D, I = tree.search(q, 12, beam, params=params)
            lims, Dr, Ir = tree.range_search(q, r, beam, params=params)
            for i in range(len(q)):
                reached = leaves[i][np.isfinite(leaf_scores[i])]
                cand = rows[np.isin(tree.leaf_of[rows], reached)]
                if len(cand):
                    D_ref, I_ref = topk_from_scores(scores[i : i + 1, cand], 12, metric)
                    I_ref = np.where(I_ref >= 0, ids[cand][np.maximum(I_ref, 0)], -1)
                    assert_equal(I[i], I_ref[0])
                    assert_close(D[i], D_ref[0], reduction_length=tree.M)
                else:
                    assert (I[i] == -1).all()
                within = cand[better(scores[i, cand], r)]
                assert_equal(Ir[lims[i] : lims[i + 1]], ids[within])
                assert_close(Dr[lims[i] : lims[i + 1]], scores[i, within], reduction_length=tree.M)
    if not share:  # every leaf reached: the PQ index's own range search
        pq_lims, _, pq_I = tree.pq.range_search(tree.transform_queries(q), r)
        lims, _, I = tree.range_search(q, r, tree.n_leaves)
        assert_equal(lims, pq_lims)
        assert_equal(I, pq_I)
    lims_t, D_t, I_t = tree.range_search(torch.from_numpy(q), r, 2)
    assert isinstance(I_t, torch.Tensor)
    assert_equal(I_t.numpy(), tree.range_search(q, r, 2)[2])
    with pytest.raises(ValueError, match="scans on the CPU"):
        tree.range_search(q, r, 2, backend="triton")
    ivf = faiss.SearchParametersIVF(sel=faiss.IDSelectorRange(0, 10))  # nprobe 1 by default
    for call in (lambda: tree.search(q, 5, 3, params=ivf), lambda: tree.range_search(q, r, 3, params=ivf)):
        with pytest.raises(ValueError, match="nprobe=1 but beam=3"):
            call()
    ivf.nprobe = 3
    assert_equal(tree.search(q, 5, 3, params=ivf)[1],
                 tree.search(q, 5, 3, params=faiss.SearchParameters(sel=faiss.IDSelectorRange(0, 10)))[1])


@pytest.mark.interpreter
def test_filtered_device_scan_matches_the_cpu_scan(small_tree):
    import faiss
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    index, x, q = small_tree
    params = faiss.SearchParameters(sel=faiss.IDSelectorRange(50, 400))
    D_cpu, I_cpu = index.search(q, 12, beam=3, backend="cpu", params=params)
    D, I = index.search(torch.from_numpy(q), 12, beam=3, backend="triton", params=params)
    assert_equal(I.numpy(), I_cpu)
    assert_close(D.numpy(), D_cpu, reduction_length=index.M)


def test_merge_from_equals_one_tree_of_both_shards(small_tree):
    import copy

    index, x, q = small_tree
    a, b = tree_with_ids(small_tree, np.arange(300), np.arange(300)), \
        tree_with_ids(small_tree, np.arange(len(x) - 300), np.arange(300, len(x)))
    a.search(q, 5, 3)  # warm both shards' caches: the merge must not serve stale lists
    b.search(q, 5, 3)
    a.merge_from(b, add_id=300)
    assert b.ntotal == 0 and len(b.leaf_of) == 0
    assert b._list_codes_cache is None and b._leaf_means is None and b._lists is None
    whole = tree_with_ids(small_tree, np.arange(len(x)))
    assert_equal(a.leaf_of, whole.leaf_of)
    assert_equal(a.ids, whole.ids)
    for beam in (1, 4):
        for got, want in zip(a.search(q, 10, beam), whole.search(q, 10, beam)):
            assert_equal(got, want)
    other_tree = copy.deepcopy(index)
    other_tree.embeddings = [e + 1 for e in other_tree.embeddings]
    other_tree.reset()
    other_tree.add_with_ids(x[:5], np.arange(5))
    other_pq = tree_with_ids(small_tree, np.arange(5), np.arange(5))
    other_pq.pq.centroids = other_pq.pq.centroids + 1
    other_tower = tree_with_ids(small_tree, np.arange(5), np.arange(5))
    other_tower.query_matrix = np.eye(24, dtype=np.float32) * 2
    for other, error, message in [(other_tree, ValueError, "routing parameters differ"),
                                  (other_tower, ValueError, "query matrices differ"),
                                  (other_pq, ValueError, "centroids differ"),
                                  (a, ValueError, "into itself"),
                                  (index.pq, TypeError, "must be a TreeIndex")]:
        with pytest.raises(error, match=message):
            a.merge_from(other)
    assert a.ntotal == len(x) and other_tree.ntotal == 5 == len(other_tree.leaf_of)
    # the same routing held in float64 (routing runs in float32): accepted
    same64 = tree_with_ids(small_tree, np.arange(5) + 10**6, np.arange(5))
    same64.log_scales = same64.log_scales.astype(np.float64)
    a.merge_from(same64)
    assert a.ntotal == len(x) + 5


def test_tree_pickle_carries_no_cache(small_tree):
    import pickle

    index, x, q = small_tree
    D, I = index.search(q, 10, 3)
    index.leaf_centroids()
    twin = pickle.loads(pickle.dumps(index))
    assert all(getattr(twin, name) is None for name in TreeIndex._CACHES)
    assert index._lists is not None  # the original keeps its own
    for got, want in zip(twin.search(q, 10, 3), (D, I)):
        assert_equal(got, want)
