"""JPQ trainer: learning on a synthetic task, resume == uninterrupted, losses, splits, export."""
import copy
import warnings

import numpy as np
import pytest
import torch

import jpq
from jpq.kernels.adc import adc_scores_reference, build_lut_reference
from jpq.pipeline import m_for_ratio
from kernel_cases import assert_topk_matches
from jpq.index import query_aware_codebooks
from jpq.train import RANDPERM_MAX_ROWS, JPQTrainer, TrainConfig, ce_loss, holdout_split, pairwise_loss, sample_rows


class ToyEncoder(torch.nn.Module):
    """Texts "q<i>" -> a fixed base vector through a trainable linear map (identity start)."""

    def __init__(self, base: np.ndarray):
        super().__init__()
        self.register_buffer("base", torch.from_numpy(base))
        self.linear = torch.nn.Linear(base.shape[1], base.shape[1], bias=False)
        torch.nn.init.eye_(self.linear.weight)

    def forward(self, texts):
        rows = torch.tensor([int(t[1:]) for t in texts])
        return self.linear(self.base[rows])


def synthetic_task(seed=0, n_docs=600, n_queries=240, d=16):
    """Queries see their positive document through a fixed distortion: a learnable problem."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_docs, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    pos = rng.integers(0, n_docs, n_queries)
    A = np.eye(d, dtype=np.float32) + 0.6 * rng.standard_normal((d, d)).astype(np.float32)
    Q = X[pos] @ A.T + 0.05 * rng.standard_normal((n_queries, d)).astype(np.float32)
    ids = [f"q{i}" for i in range(n_queries)]
    qrels = {q: {int(p): 1} for q, p in zip(ids, pos)}
    return X, Q.astype(np.float32), ids, qrels


def make_trainer(mode="jpq", out_dir=None, epochs=4, seed=0, pseudo_queries=None, unit_norm=False, **kw):
    X, Q, ids, qrels = synthetic_task(seed)
    index = None
    if mode != "encoder":
        index = jpq.PQIndex(X.shape[1], 4, nbits=4, metric="ip", opq=False, unit_norm=unit_norm)
        index.train(X, niter=10, seed=seed)
        index.add(X)
    enc = ToyEncoder(Q) if mode in ("jpq", "encoder") else None
    cfg = TrainConfig(mode=mode, epochs=epochs, batch_size=32, negatives=20, lr_encoder=5e-3,
                      lr_centroids=5e-3, patience=epochs, seed=seed, **kw)
    return JPQTrainer(cfg, X, index, ids, qrels, query_texts={q: q for q in ids},
                      query_embeddings={q: Q[i] for i, q in enumerate(ids)}, encoder=enc,
                      out_dir=out_dir, progress=False, pseudo_queries=pseudo_queries)


@pytest.mark.parametrize("mode", ["jpq", "encoder", "centroids"])
@pytest.mark.parametrize("loss", ["ce", "pairwise"])
def test_training_improves_its_own_retrieval_metric(mode, loss):
    trainer = make_trainer(mode, epochs=6, loss=loss)
    before = trainer.evaluate_ids(trainer.train_ids)["ndcg@10"]
    history = trainer.fit()
    after = trainer.evaluate_ids(trainer.train_ids)["ndcg@10"]
    assert after > before + 0.02, (before, after, history)
    assert history[0]["epoch"] == 0 and len(history) >= 2
    # the selected epoch is the best one on validation
    assert trainer.state.best_score == max(h["val"] for h in history)


def test_resume_gives_the_same_centroids_as_an_uninterrupted_run(tmp_path):
    full = make_trainer("jpq", out_dir=tmp_path / "full", epochs=3)
    full.fit()
    first = make_trainer("jpq", out_dir=tmp_path / "cut", epochs=3)
    first.fit(stop_after_epoch=1)  # "interrupted" after one epoch
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    resumed = make_trainer("jpq", out_dir=tmp_path / "cut", epochs=3)
    resumed.fit(resume=True)
    assert [h["val"] for h in resumed.state.history] == [h["val"] for h in full.state.history]
    torch.testing.assert_close(resumed.centroids, full.centroids, rtol=0, atol=0)
    for a, b in zip(resumed.encoder.parameters(), full.encoder.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_refuses_a_different_configuration(tmp_path):
    make_trainer("centroids", out_dir=tmp_path, epochs=2).fit(stop_after_epoch=1)
    other = make_trainer("centroids", out_dir=tmp_path, epochs=3)
    with pytest.raises(ValueError, match="different configuration .epochs: 2 there, 3 here"):
        other.fit(resume=True)


def test_resume_refuses_a_checkpoint_trained_on_other_data(tmp_path):
    """Same configuration, same shapes, another corpus (or other judgments): resuming would
    continue from, and write back, the other corpus's codes and centroids."""
    make_trainer("centroids", out_dir=tmp_path, epochs=2).fit(stop_after_epoch=1)
    X, Q, ids, qrels = synthetic_task(seed=0)
    index = jpq.PQIndex(X.shape[1], 4, nbits=4, metric="ip").train(X, niter=10, seed=0)
    index.add(X)
    cfg = make_trainer("centroids", epochs=2).cfg

    def resume(docs, judgments):
        trainer = JPQTrainer(cfg, docs, index, ids, judgments, query_embeddings={q: Q[i] for i, q in enumerate(ids)},
                             out_dir=tmp_path, progress=False)
        before = index.codes.copy()
        with pytest.raises(ValueError, match="trained on other data"):
            trainer.fit(resume=True)
        np.testing.assert_array_equal(index.codes, before)  # nothing loaded into the caller's index

    resume(X[::-1].copy(), qrels)  # other document vectors
    resume(X, {q: {(next(iter(rel)) + 1) % len(X): 1} for q, rel in qrels.items()})  # other judgments
    resumed = JPQTrainer(cfg, X, index, ids, qrels, query_embeddings={q: Q[i] for i, q in enumerate(ids)},
                         out_dir=tmp_path, progress=False)
    resumed.fit(resume=True)  # the same data resumes
    assert resumed.state.epoch == 2


def test_trained_index_saves_loads_and_exports_to_faiss(tmp_path):
    pytest.importorskip("faiss")
    trainer = make_trainer("centroids", epochs=2)
    trainer.fit()
    index = trainer.trained_index()
    assert not np.array_equal(index.centroids, trainer.index.centroids) or trainer.state.best_epoch == 0
    q = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32)
    D, I = index.search(q, 10)
    index.save(tmp_path / "t.jpq")
    back = jpq.PQIndex.load(tmp_path / "t.jpq")
    np.testing.assert_array_equal(back.search(q, 10)[1], I)
    Df, If = index.to_faiss().search(q, 10)
    scores = adc_scores_reference(build_lut_reference(q, index.centroids, "ip"), index.codes)
    assert_topk_matches(Df.astype(np.float32), If.astype(np.int64), D, I, scores, atol=1e-5)


def test_holdout_split_random_and_disjoint():
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(200)]
    qrels = {q: {int(d): 1 for d in rng.integers(0, 150, 2)} for q in ids}
    tr, va = holdout_split(ids, qrels, 0.2, seed=1)
    assert len(va) == 40 and set(tr) | set(va) == set(ids) and not set(tr) & set(va)
    assert holdout_split(ids, qrels, 0.2, seed=1) == (tr, va)  # deterministic
    tr, va = holdout_split(ids, qrels, 0.2, seed=1, disjoint=True)
    seen = {d for q in tr for d in qrels[q]}
    assert va and not any(d in seen for q in va for d in qrels[q])


def test_a_hold_out_that_leaves_nothing_to_train_on_is_refused_and_a_lopsided_one_warns():
    with pytest.raises(ValueError, match="val_fraction=0.999 .*nothing left to train on"):
        make_trainer(val_fraction=0.999)
    with pytest.warns(UserWarning, match=r"trains on 24 of 240 queries and holds out 216"):
        trainer = make_trainer(val_fraction=0.9)
    assert (len(trainer.train_ids), len(trainer.val_ids)) == (24, 216)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default hold-out: no warning
        make_trainer()


def test_losses_push_positives_up():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]], requires_grad=True)
    pos = torch.tensor([[True, False, False, False]])
    valid = torch.tensor([[True, True, True, False]])
    for fn in (ce_loss, pairwise_loss):
        logits.grad = None
        fn(logits, pos, valid).backward()
        g = logits.grad[0]
        assert g[0] < 0 and g[1] > 0 and g[2] > 0 and g[3] == 0, (fn.__name__, g)
    # CE by hand: -log(e^0 / (e^0 + e^1 + e^2))
    expected = -np.log(1 / (1 + np.e + np.e ** 2))
    assert float(ce_loss(logits, pos, valid).detach()) == pytest.approx(expected, rel=1e-6)


def test_config_and_trainer_validation():
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainConfig(mode="adore")
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="hinge")
    X, Q, ids, qrels = synthetic_task()
    emb = {q: Q[i] for i, q in enumerate(ids)}
    with pytest.raises(ValueError, match="needs a trained PQIndex"):
        JPQTrainer(TrainConfig(mode="centroids"), X, None, ids, qrels, query_embeddings=emb)
    index = jpq.PQIndex(X.shape[1], 4, nbits=4, metric="ip").train(X, niter=2, seed=0)
    index.add(X)
    cfg = TrainConfig(mode="centroids")

    def refused(error, message, **over):
        args = {"doc_embeddings": X, "index": index, "query_ids": ids, "qrels": qrels, "query_embeddings": emb, **over}
        with pytest.raises(error, match=message):
            JPQTrainer(cfg, **args, progress=False)

    # qrels keys are rows of doc_embeddings, not BEIR document ids
    refused(TypeError, "document key '3' .str.*Dataset.doc_index", qrels={**qrels, ids[0]: {"3": 1}})
    refused(TypeError, "document key 3.7", qrels={**qrels, ids[0]: {3.7: 1}})
    refused(ValueError, "document row -1, outside the 600 rows", qrels={**qrels, ids[0]: {-1: 1}})
    refused(ValueError, "document row 600, outside", qrels={**qrels, ids[0]: {600: 1}})
    refused(ValueError, "nothing to train on", qrels={q: {0: 0} for q in ids})
    refused(ValueError, "nothing to train on", qrels={})
    refused(ValueError, "query_ids has duplicates", query_ids=ids + ids[:1])
    refused(ValueError, r"index has d=16 but doc_embeddings has 8 columns", doc_embeddings=X[:, :8])
    refused(ValueError, r"doc_embeddings must have shape \(N, d\)", doc_embeddings=X[:, 0])
    refused(ValueError, r"query_embeddings\['q0'\] must have shape \(16,\)", query_embeddings={**emb, "q0": Q[0, :8]})
    refused(ValueError, r"query_embeddings\['q0'\] contains NaN", query_embeddings={**emb, "q0": Q[0] * np.nan})
    # every number of the configuration is checked when it is made, not when it is first used
    for bad, error, message in [
            ({"lr_centroids": -1.0}, ValueError, "lr_centroids must be a finite number >= 0"),
            ({"weight_decay": float("nan")}, ValueError, "weight_decay must be a finite number >= 0"),
            ({"corpus_recon_weight": -1.0}, ValueError, "corpus_recon_weight must be a finite"),
            ({"scale": 0.0}, ValueError, "scale must be a finite number > 0"),
            ({"patience": 0}, ValueError, "patience must be >= 1"),
            ({"epochs": 1.5}, TypeError, "epochs must be an int, got float"),
            ({"batch_size": True}, TypeError, "batch_size must be an int, got bool"),
            ({"seed": -1}, ValueError, "seed must be >= 0"),
            ({"guard_min_queries": 1}, ValueError, "guard_min_queries must be >= 2"),
            ({"holdout": "disjont"}, ValueError, "holdout must be one of"),
            ({"val_metric": "foo"}, ValueError, "unknown metric 'foo'"),
            ({"bucket_by_length": "no"}, TypeError, "bucket_by_length must be True or False")]:
        with pytest.raises(error, match=message):
            TrainConfig(**bad)


def test_m_for_ratio_matches_the_demo_table():
    assert [m_for_ratio(384, r) for r in (16, 32, 64, 96)] == [96, 48, 24, 16]
    assert m_for_ratio(768, 32) == 96


def test_without_held_out_queries_every_epoch_runs_and_the_last_is_kept():
    trainer = make_trainer("jpq", epochs=3, val_fraction=0.0)
    assert trainer.val_ids == []
    history = trainer.fit()
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert all(h["val"] is None for h in history)
    assert trainer.state.best_epoch == 3
    # the kept state is the last epoch's: one more trainer stopped after 3 of 5 epochs agrees
    cut = make_trainer("jpq", epochs=5, val_fraction=0.0)
    cut.fit(stop_after_epoch=3)
    torch.testing.assert_close(trainer.centroids, cut.centroids, rtol=0, atol=0)


class TextLengthEncoder(ToyEncoder):
    """ToyEncoder whose query texts have different lengths ("q<i>" + padding)."""

    def forward(self, texts):
        return super().forward([t.split()[0] for t in texts])


def test_length_bucketed_batches_cover_every_query_once_with_little_padding():
    X, Q, ids, qrels = synthetic_task(0)
    rng = np.random.default_rng(5)
    texts = {q: q + " " + "x " * int(rng.integers(0, 60)) for q in ids}
    cfg = TrainConfig(mode="encoder", batch_size=16, val_fraction=0.0)
    trainer = JPQTrainer(cfg, X, None, ids, qrels, query_texts=texts, encoder=TextLengthEncoder(Q), progress=False)
    batches = trainer._batches(np.random.default_rng(0))
    flat = [q for b in batches for q in b]
    assert sorted(flat) == sorted(ids) and len(flat) == len(ids)
    assert all(len(b) <= 16 for b in batches)

    def padded(bs):
        return sum(max(len(texts[q]) for q in b) * len(b) for b in bs) / sum(len(texts[q]) for q in ids)

    plain = JPQTrainer(TrainConfig(mode="encoder", batch_size=16, val_fraction=0.0, bucket_by_length=False), X, None,
                       ids, qrels, query_texts=texts, encoder=TextLengthEncoder(Q), progress=False)
    assert padded(batches) < 0.8 * padded(plain._batches(np.random.default_rng(0)))
    # deterministic for a seed, different across epochs
    assert trainer._batches(np.random.default_rng(0)) == batches
    assert trainer._batches(np.random.default_rng(1)) != batches
    # training through bucketed batches still learns
    before = trainer.evaluate_ids(ids)["ndcg@10"]
    trainer.cfg.lr_encoder = 5e-3
    trainer.optimizer.param_groups[0]["lr"] = 5e-3
    trainer.fit()
    assert trainer.evaluate_ids(ids)["ndcg@10"] > before + 0.02


def toy_workspace(seed=0):
    """The synthetic task as a Workspace (documents d<i>, queries q<i> all in the train split)."""
    from jpq.data import BeirDataset
    from jpq.pipeline import Workspace

    X, Q, ids, qrels = synthetic_task(seed)
    doc_ids = [f"d{i}" for i in range(len(X))]
    ds = BeirDataset(doc_ids, doc_ids, ids, ids,
                     {"train": {q: {f"d{d}": r for d, r in rel.items()} for q, rel in qrels.items()}, "test": {}},
                     "toy", "")
    return Workspace(ds, ToyEncoder(Q), X, Q, "train", "test")


def test_train_run_refits_on_all_training_queries_for_the_selected_epochs(tmp_path):
    from jpq.pipeline import refit_run, train_run

    ws = toy_workspace()
    index = jpq.PQIndex(16, 4, nbits=4, metric="ip")
    index.train(ws.doc_emb, niter=10, seed=0)
    index.add(ws.doc_emb)
    initial = index.centroids.copy()
    cfg = TrainConfig(mode="jpq", epochs=4, batch_size=32, negatives=20, lr_encoder=5e-3, lr_centroids=5e-3, patience=4)
    trainer, secs, selection = train_run(ws, cfg, index, tmp_path / "run", progress=False)
    assert selection.best_epoch >= 1 and secs > 0
    assert trainer.state is not selection and trainer.val_ids == []
    assert len(trainer.train_ids) == len(ws.train_ids())
    assert trainer.state.epoch == trainer.state.best_epoch == selection.best_epoch
    assert (tmp_path / "run" / "refit" / "best.pt").exists()
    # the index it was given is untouched, and a resumed call reproduces the refit model exactly
    np.testing.assert_array_equal(index.centroids, initial)
    assert not np.array_equal(trainer.centroids.detach().numpy(), initial)
    again, _, sel2 = train_run(ws, cfg, index, tmp_path / "run", progress=False)
    assert sel2.best_epoch == selection.best_epoch
    torch.testing.assert_close(again.centroids, trainer.centroids, rtol=0, atol=0)
    # without refit the selected run itself comes back
    plain, _, sel3 = train_run(ws, TrainConfig(**{**cfg.__dict__, "refit": False}), index, None, progress=False)
    assert plain.state is sel3 and len(plain.val_ids) > 0
    # in two steps (the demo refits only the run that won its selection): the same models
    selected, _, sel4 = train_run(ws, cfg, index, tmp_path / "two", progress=False, select_only=True)
    assert selected.state is sel4 and sel4.best_epoch == selection.best_epoch
    assert not (tmp_path / "two" / "refit").exists()
    torch.testing.assert_close(selected.centroids, plain.centroids, rtol=0, atol=0)
    final, secs = refit_run(ws, cfg, index, tmp_path / "two", selected, progress=False)
    assert final.state is not sel4 and final.val_ids == [] and secs > 0
    torch.testing.assert_close(final.centroids, trainer.centroids, rtol=0, atol=0)


def test_unseen_guard_blocks_epochs_that_lose_on_unseen_held_out_queries():
    trainer = make_trainer("centroids", epochs=2)
    # "unseen": held-out queries none of whose positives is a kept training query's positive
    seen = {d for q in trainer.train_ids for d in trainer.qrels[q]}
    assert trainer.val_unseen_ids == [q for q in trainer.val_ids if not set(trainer.qrels[q]) & seen]
    assert 10 < len(trainer.val_unseen_ids) < len(trainer.val_ids) and trainer.guarded
    rec0 = trainer._initial_record()
    assert len(rec0["val_unseen"]) == len(trainer.val_unseen_ids)
    trainer.state.history.append(rec0)
    base = np.asarray(rec0["val_unseen"])
    noise = np.random.default_rng(0).normal(0, 0.05, len(base))
    same = trainer._guard({"epoch": 1, "val": 0.9, "val_unseen": list(base + noise - noise.mean())})
    worse = trainer._guard({"epoch": 2, "val": 0.95, "val_unseen": list(base + noise - 0.1)})
    assert same["eligible"] and not worse["eligible"]
    assert worse["unseen_change"] == pytest.approx(-0.1 + noise.mean()) and worse["unseen_se"] > 0
    # an ineligible epoch is recorded but never selected, even with the best held-out score
    trainer.state.best_score, trainer.state.best_epoch = rec0["val"], 0
    best = trainer._close_epoch({**same, "loss": 1.0}, {})
    best = trainer._close_epoch({**worse, "loss": 1.0}, best)
    assert trainer.state.best_epoch == 1 and trainer.state.best_score == 0.9
    # a guard-free configuration selects on the held-out score alone
    free = make_trainer("centroids", epochs=2, unseen_guard=False)
    assert not free.guarded and "val_unseen" not in free._initial_record()


@pytest.mark.parametrize("tolerance, eligible", [(0.0, [True, False, False]), (1.0, [True, True, False]),
                                                 (3.0, [True, True, True])])
def test_unseen_guard_tolerance_counts_standard_errors_of_the_change(tolerance, eligible):
    trainer = make_trainer("centroids", epochs=2, guard_tolerance=tolerance)
    rec0 = trainer._initial_record()
    trainer.state.history.append(rec0)
    base = np.asarray(rec0["val_unseen"])
    noise = np.random.default_rng(1).normal(0, 0.05, len(base))
    noise -= noise.mean()
    se = float(noise.std(ddof=1) / np.sqrt(len(base)))
    # mean changes of +0.5, -0.5 and -2 standard errors (same spread)
    got = [trainer._guard({"epoch": 1, "val": 0.9, "val_unseen": list(base + noise + shift * se)})["eligible"]
           for shift in (0.5, -0.5, -2.0)]
    assert got == eligible


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_guard_tolerance_must_be_a_finite_non_negative_number(bad):
    with pytest.raises(ValueError, match="guard_tolerance"):
        TrainConfig(guard_tolerance=bad)


def test_corpus_reconstruction_term_holds_unqueried_documents_in_place():
    """Centroids trained toward the training positives move every document sharing their codes;
    the corpus term keeps the reconstruction of the documents no query points to close to the
    post-hoc one."""
    def drift(weight):
        trainer = make_trainer("centroids", epochs=4, corpus_recon_weight=weight, unseen_guard=False)
        positives = {d for q in trainer.qrels.values() for d in q}
        others = np.array([i for i in range(len(trainer.X)) if i not in positives])
        before = trainer.trained_index().reconstruct_n(0, len(trainer.X))[others]
        trainer.fit()
        assert trainer.state.best_epoch > 0
        after = trainer.trained_index().reconstruct_n(0, len(trainer.X))[others]
        return float(((after - before) ** 2).sum(1).mean())

    # here every centroid (K=16) is shared by training positives, so holding the others in place
    # fights the ranking loss: the effect grows with the weight
    free, some, held = drift(0.0), drift(10.0), drift(100.0)
    assert held < some < free and held < 0.75 * free, (free, some, held)


def refit_task():
    """The synthetic task with a 4-bit inner-product PQ index of its documents, for the
    initialisations that refit the index; returns (X, Q, ids, qrels, index, make), where
    make(out_dir=None, **config) is a 2-epoch centroids-only trainer on that index."""
    X, Q, ids, qrels = synthetic_task(0)
    index = jpq.PQIndex(X.shape[1], 4, nbits=4, metric="ip").train(X, niter=10, seed=0)
    index.add(X)

    def make(out_dir=None, **kw):
        cfg = TrainConfig(mode="centroids", epochs=2, batch_size=32, negatives=20, lr_centroids=5e-3, **kw)
        return JPQTrainer(cfg, X, index, ids, qrels, query_embeddings={q: Q[i] for i, q in enumerate(ids)},
                          out_dir=out_dir, progress=False)
    return X, Q, ids, qrels, index, make


def test_query_aware_init_refits_the_codes_from_training_queries_and_resume_restores_them(tmp_path):
    X, Q, ids, qrels, index, make = refit_task()
    before = index.codes.copy()

    def trainer(out_dir=None, **kw):
        return make(out_dir, **{"query_aware_init": True, **kw})
    plain = trainer(query_aware_init=False)
    assert plain.index is index
    assert TrainConfig().query_aware_init is False  # opt-in (see TrainConfig)
    aware = trainer()
    np.testing.assert_array_equal(index.codes, before)  # the given index is left alone
    assert aware.index is not index and (aware.index.codes != before).any()
    # the refit used the kept training queries only: the same codes as calling it by hand on them
    ref = query_aware_codebooks(index, X, Q[[ids.index(q) for q in aware.train_ids]], shrinkage=0.3, seed=0)
    np.testing.assert_array_equal(aware.index.codes, ref.codes)
    # epoch 0 is scored on the refit index, and the checkpoint carries its codes
    first = trainer(out_dir=tmp_path)
    first.fit(stop_after_epoch=1)
    resumed = trainer(out_dir=tmp_path)
    resumed.index.codes = np.zeros_like(resumed.index.codes)  # as if a k-means re-run had differed
    resumed.fit(resume=True)
    np.testing.assert_array_equal(resumed.index.codes, first.index.codes)
    np.testing.assert_array_equal(resumed.trained_index().codes, first.index.codes)
    with pytest.raises(ValueError, match="query_aware_shrinkage"):
        TrainConfig(query_aware_shrinkage=0.0)


def test_anisotropic_init_refits_the_codes_when_on_and_resume_restores_them(tmp_path):
    from jpq.index import anisotropic_codebooks

    X, Q, ids, qrels, index, trainer = refit_task()
    before = index.codes.copy()
    assert TrainConfig().anisotropic_eta == 1.0  # opt-in (see TrainConfig)
    assert trainer(anisotropic_eta=1.0).index is index  # 1 = off: the given index as it is
    aniso = trainer(anisotropic_eta=4.0)
    np.testing.assert_array_equal(index.codes, before)  # the given index is left alone
    ref = anisotropic_codebooks(index, X, eta=4.0, seed=0)
    np.testing.assert_array_equal(aniso.index.codes, ref.codes)
    np.testing.assert_array_equal(aniso.centroids.detach().numpy(), ref.centroids)
    assert (aniso.index.codes != before).any()
    # an l2 index is refused: loss, hard negatives and validation score inner products
    l2 = jpq.PQIndex(X.shape[1], 4, nbits=4, metric="l2").train(X, niter=10, seed=0)
    l2.add(X)
    with pytest.raises(ValueError, match="inner-product scores"):
        JPQTrainer(TrainConfig(mode="centroids", epochs=1, anisotropic_eta=4.0), X, l2, ids, qrels,
                   query_embeddings={q: Q[i] for i, q in enumerate(ids)}, progress=False)
    # a stopped and resumed run ends where an uninterrupted one does, codes included
    full = trainer(tmp_path / "full", anisotropic_eta=4.0)
    full.fit()
    part = trainer(tmp_path / "part", anisotropic_eta=4.0)
    part.fit(stop_after_epoch=1)
    again = trainer(tmp_path / "part", anisotropic_eta=4.0)
    again.fit(resume=True)
    np.testing.assert_array_equal(again.index.codes, full.index.codes)
    torch.testing.assert_close(again.centroids, full.centroids, rtol=0, atol=0)


@pytest.mark.parametrize("eta", [0.5, float("nan"), float("inf"), True, "4"])
def test_anisotropic_eta_is_validated(eta):
    with pytest.raises(ValueError, match="anisotropic_eta"):
        TrainConfig(anisotropic_eta=eta)


def test_two_initialisations_are_refused():
    with pytest.raises(ValueError, match="pick one"):
        TrainConfig(query_aware_init=True, anisotropic_eta=4.0)
    TrainConfig(query_aware_init=True)  # either alone is fine
    TrainConfig(anisotropic_eta=4.0)


def test_the_guard_compares_with_the_index_as_given_when_an_initialisation_refits_it():
    plain = make_trainer("centroids", epochs=2)
    aniso = make_trainer("centroids", epochs=2, anisotropic_eta=4.0)
    assert aniso.guarded and aniso.index is not aniso._given_index
    rec0, rec_plain = aniso._initial_record(), plain._initial_record()
    m = aniso.cfg.val_metric
    # epoch 0 is scored (and selectable) on the refit index...
    ref = aniso.evaluate_ids(aniso.val_ids, metrics=(m,), per_query=True)[m]
    assert rec0["val"] == pytest.approx(float(np.mean([ref[q] for q in aniso.val_ids])))
    assert rec0["val_unseen_refit_start"] == [ref[q] for q in aniso.val_unseen_ids]
    # ...while the guard's reference is the index as given: the plain trainer's epoch 0
    assert rec0["val_unseen"] == pytest.approx(rec_plain["val_unseen"])
    given = aniso.evaluate_ids(aniso.val_unseen_ids, metrics=(m,), per_query=True, index=aniso._given_index)[m]
    assert rec0["val_unseen"] == [given[q] for q in aniso.val_unseen_ids]
    assert "val_unseen_refit_start" not in rec_plain
    aniso.fit()
    assert all("eligible" in r for r in aniso.state.history[1:])


# --------------------------------------------------------------------------- device
def test_device_is_validated_and_auto_resolves_to_what_torch_sees():
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="meta")
    with pytest.raises(TypeError, match="device"):
        TrainConfig(device=0)
    trainer = make_trainer("jpq", epochs=1, device="auto")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert trainer.device.type == want and trainer.centroids.device.type == want
    assert trainer.X_t.device.type == want and trainer.codes.device.type == want
    assert next(trainer.encoder.parameters()).device.type == want
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            make_trainer("jpq", epochs=1, device="cuda")


def test_hard_negative_search_equals_the_kernels_on_numpy():
    """The trainer searches with torch tensors on its device; on the CPU that is exactly
    adc_topk(build_lut(...)) on NumPy arrays (same kernels), for every mode's index."""
    from jpq.kernels import adc_topk, build_lut

    for mode in ("jpq", "encoder"):
        trainer = make_trainer(mode, epochs=1)
        q = trainer._queries(trainer.train_ids[:9], grad=False)
        D, I = trainer.search(q, 15)
        assert isinstance(D, np.ndarray) and I.dtype == np.int64 and I.shape == (9, 15)
        qn = q.numpy()
        if mode == "jpq":
            D_ref, I_ref = adc_topk(build_lut(qn, trainer.centroids.detach().numpy()), trainer.index.codes, 15)
        else:
            s = qn @ trainer.X.T
            I_ref = np.argsort(-s, axis=1, kind="stable")[:, :15]
            D_ref = np.take_along_axis(s, I_ref, 1)
        np.testing.assert_array_equal(I, I_ref)
        np.testing.assert_allclose(D, D_ref, rtol=1e-6, atol=1e-6)


def test_resume_may_change_the_device_field(tmp_path):
    """`device` says where training runs, not what it computes: a run cut on one device setting
    resumes under another ("auto" is the CPU here) and ends with the uninterrupted centroids."""
    full = make_trainer("jpq", out_dir=tmp_path / "full", epochs=3)
    full.fit()
    make_trainer("jpq", out_dir=tmp_path / "cut", epochs=3).fit(stop_after_epoch=1)
    resumed = make_trainer("jpq", out_dir=tmp_path / "cut", epochs=3,
                           device="auto" if not torch.cuda.is_available() else "cpu")
    resumed.fit(resume=True)
    torch.testing.assert_close(resumed.centroids.cpu(), full.centroids, rtol=0, atol=0)
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ck["model"]["centroids"].device.type == "cpu"
    assert all(v.device.type == "cpu" for v in ck["model"]["encoder"].values())


def _pseudo_hits(trainer, P, rows):
    """Share of documents `rows` that their own pseudo-query ranks first in the current index."""
    _, I = trainer.search(torch.from_numpy(P[rows]), 1)
    return float((I[:, 0] == rows).mean())


def test_pseudo_query_term_trains_the_centroids_toward_documents_no_query_points_to():
    """Each document's pseudo-query (here a fixed distortion of it, as a title is of its
    abstract) with its own document as the positive: the term should make the trained index rank
    documents that no training query points to first for their pseudo-queries more often."""
    X, _, _, qrels = synthetic_task(0)
    rng = np.random.default_rng(7)
    B = np.eye(X.shape[1], dtype=np.float32) + 0.3 * rng.standard_normal((X.shape[1],) * 2).astype(np.float32)
    P = (X @ B.T).astype(np.float32)
    positives = {d for rel in qrels.values() for d in rel}
    others = np.array([i for i in range(len(X)) if i not in positives])

    def trained(weight):
        t = make_trainer("centroids", epochs=4, unseen_guard=False, val_fraction=0.0,
                         pseudo_query_weight=weight, pseudo_queries_per_step=64, pseudo_queries=P)
        assert (t.pseudo_queries is None) == (weight == 0)
        t.fit()
        return t

    base = make_trainer("centroids", epochs=4)
    start = _pseudo_hits(base, P, others)
    off, on = _pseudo_hits(trained(0.0), P, others), _pseudo_hits(trained(3.0), P, others)
    assert on > max(off, start) + 0.05, (start, off, on)


def test_pseudo_query_inputs_are_validated_and_resume_replays_the_same_draws(tmp_path):
    X, Q, ids, qrels = synthetic_task(0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="pseudo_query_weight"):
            TrainConfig(pseudo_query_weight=bad)
    with pytest.raises(ValueError, match="pseudo_queries_per_step"):
        TrainConfig(pseudo_queries_per_step=0)
    with pytest.raises(ValueError, match="needs pseudo_queries"):
        make_trainer("jpq", pseudo_query_weight=1.0)
    index = jpq.PQIndex(X.shape[1], 4, nbits=4, metric="ip")
    index.train(X, niter=5)
    index.add(X)
    cfg = TrainConfig(mode="centroids", pseudo_query_weight=1.0)
    with pytest.raises(ValueError, match="one row per document"):
        JPQTrainer(cfg, X, index, ids, qrels, query_embeddings={q: Q[i] for i, q in enumerate(ids)},
                   progress=False, pseudo_queries=X[:10])
    # mode "encoder" has no centroids for the term to train: pseudo-queries are not needed
    assert make_trainer("encoder", pseudo_query_weight=1.0).pseudo_queries is None
    # torch input, and a resumed run equals an uninterrupted one with the term on
    P = torch.from_numpy(X[:, ::-1].copy())
    full = make_trainer("jpq", out_dir=tmp_path / "full", epochs=3, pseudo_query_weight=1.0, pseudo_queries=P)
    full.fit()
    assert all(h["pseudo"] > 0 for h in full.state.history[1:])
    make_trainer("jpq", out_dir=tmp_path / "cut", epochs=3, pseudo_query_weight=1.0,
                 pseudo_queries=P).fit(stop_after_epoch=1)
    resumed = make_trainer("jpq", out_dir=tmp_path / "cut", epochs=3, pseudo_query_weight=1.0, pseudo_queries=P)
    resumed.fit(resume=True)
    assert [h["val"] for h in resumed.state.history] == [h["val"] for h in full.state.history]
    torch.testing.assert_close(resumed.centroids, full.centroids, rtol=0, atol=0)


def test_train_run_embeds_the_pseudo_queries_once_and_hands_them_to_every_trainer(tmp_path):
    from types import SimpleNamespace

    from jpq.pipeline import train_run

    ws = toy_workspace()
    ws.dataset.corpus_titles = [f"title {i}" for i in range(len(ws.doc_emb))]
    calls = []

    class StubEncoder:  # the frozen encoder's interface that cached_embeddings reads
        name, dim, model = "stub", 16, SimpleNamespace(max_seq_length=8)

        def encode(self, texts):
            calls.append(list(texts))
            return np.stack([ws.doc_emb[int(t.split()[1])] * 2 for t in texts]).astype(np.float32)

    ws.encoder, ws.cache_dir = StubEncoder(), tmp_path / "cache"
    index = jpq.PQIndex(16, 4, nbits=4, metric="ip")
    index.train(ws.doc_emb, niter=10, seed=0)
    index.add(ws.doc_emb)
    cfg = TrainConfig(mode="centroids", epochs=2, batch_size=32, negatives=20, lr_centroids=5e-3, patience=2,
                      pseudo_query_weight=1.0, unseen_guard=False)
    trainer, _, selection = train_run(ws, cfg, index, tmp_path / "run", progress=False)
    assert sum(len(c) for c in calls) == len(ws.doc_emb)  # every title, once
    np.testing.assert_array_equal(trainer.pseudo_queries.numpy(), ws.doc_emb * 2)
    assert "pseudo" in trainer.state.history[-1]
    # cached on disk: a second workspace does not encode again
    ws2 = toy_workspace()
    ws2.dataset.corpus_titles, ws2.encoder, ws2.cache_dir = ws.dataset.corpus_titles, StubEncoder(), ws.cache_dir
    np.testing.assert_array_equal(ws2.pseudo_query_emb(progress=False), ws.doc_emb * 2)
    assert sum(len(c) for c in calls) == len(ws.doc_emb)


def test_unit_norm_index_trains_and_scores_as_it_searches():
    """With a unit_norm index the trainer ranks (hard negatives, validation) and scores (the loss)
    the reconstructions rescaled to unit norm, as the trained index searches; training still
    improves its own metric, and the gradient reaches the centroids through the norms."""
    trainer = make_trainer("jpq", epochs=5, unit_norm=True)
    before = trainer.evaluate_ids(trainer.train_ids)["ndcg@10"]
    trainer.fit()
    assert trainer.evaluate_ids(trainer.train_ids)["ndcg@10"] > before + 0.02
    index = trainer.trained_index()
    assert index.unit_norm
    q = trainer._queries(trainer.train_ids[:9], grad=False)
    D, I = trainer.search(q, 15)
    D_ref, I_ref = index.search(q.numpy(), 15)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-6)
    rec = index.decode(index.codes)  # unit-norm reconstructions
    cand = I[:, :6]
    scores, _ = trainer._scores(q, cand)
    expected = np.einsum("bd,bpd->bp", q.numpy(), rec[cand])
    np.testing.assert_allclose(scores.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    # the gradient is that of q . x_hat / ||x_hat|| in plain torch autograd (norms included)
    weights = torch.randn(cand.shape)
    trainer.centroids.grad = None
    (trainer._scores(q, cand)[0] * weights).sum().backward()
    C = trainer.centroids.detach().clone().requires_grad_(True)
    codes = torch.from_numpy(index.codes[cand]).long()  # (B, P, M)
    x_hat = C[torch.arange(C.shape[0]), codes].flatten(2)  # (B, P, d)
    ref = torch.einsum("bd,bpd->bp", q, x_hat / x_hat.norm(dim=-1, keepdim=True))
    (ref * weights).sum().backward()
    torch.testing.assert_close(trainer.centroids.grad, C.grad, rtol=1e-4, atol=1e-5)


def test_early_stopping_goes_on_while_the_guard_has_blocked_every_gain():
    """stops_early: patience epochs without any held-out gain stop a run, except when every gain so
    far was blocked by the unseen guard (best eligible epoch still 0): stopping there would return
    the untrained start."""
    from jpq.train import TrainState, stops_early

    # gains up to epoch 6, none since: epoch 9 is three epochs later
    blocked = TrainState(epoch=9, best_epoch=0, improved_epoch=6)
    assert not stops_early(blocked, patience=3)
    assert stops_early(TrainState(epoch=9, best_epoch=6, improved_epoch=6), patience=3)  # an eligible gain
    assert stops_early(TrainState(epoch=9, best_epoch=4, improved_epoch=6), patience=3)  # one allowed earlier
    assert stops_early(TrainState(epoch=3, best_epoch=0, improved_epoch=0), patience=3)  # no gain at all
    assert not stops_early(TrainState(epoch=8, best_epoch=0, improved_epoch=6), patience=3)


def test_a_run_whose_gains_the_guard_blocks_trains_past_patience_and_selects_the_first_allowed_epoch():
    """The real fit loop in the hazard `stops_early` guards against: the held-out score rises at
    epochs 1-2 while the unseen-positive queries lose (blocked), then stalls for `patience` epochs
    (where a plain early stop would end the run and return the untrained start); the run goes on,
    epoch 6 is allowed and wins, epochs 7-9 bring nothing and stop it. Scripted held-out values,
    real steps, guard, selection and state loading."""
    trainer = make_trainer("centroids", epochs=12)
    trainer.cfg.patience = 3  # make_trainer sets patience = epochs
    assert trainer.guarded
    n = len(trainer.val_unseen_ids)
    script = {0: (0.50, 0.5), 1: (0.55, 0.3), 2: (0.56, 0.3), 3: (0.54, 0.3), 4: (0.54, 0.3), 5: (0.54, 0.3),
              6: (0.60, 0.5), 7: (0.58, 0.5), 8: (0.58, 0.5), 9: (0.58, 0.5), 10: (0.9, 0.5)}
    snapshots = []

    def scripted_validate():
        epoch = len(snapshots)
        snapshots.append(trainer.centroids.detach().clone())
        val, unseen = script[epoch]
        return {"val": val, "val_unseen": [unseen] * n}

    trainer._validate = scripted_validate
    history = trainer.fit()
    assert [h["epoch"] for h in history] == list(range(10))  # ran past epoch 5, stopped after 9
    assert [h.get("eligible", True) for h in history] == [True] + [False] * 5 + [True] * 4
    assert trainer.state.best_epoch == 6 and trainer.state.best_score == 0.60
    # the loaded centroids are those of epoch 6, not the untrained start nor the last epoch
    torch.testing.assert_close(trainer.centroids.detach(), snapshots[6], rtol=0, atol=0)
    assert not torch.equal(snapshots[6], snapshots[0]) and not torch.equal(snapshots[6], snapshots[9])


@pytest.mark.parametrize("N,n", [(10, 3), (10, 20), (1 << 16, 7), (100_000, 512), (100_000, 30_000), (100_000, 1)])
def test_sample_rows_draws_distinct_rows_reproducibly(N, n):
    torch.manual_seed(0)
    a = sample_rows(N, n)
    torch.manual_seed(0)
    b = sample_rows(N, n)
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert len(a) == min(n, N) == len(torch.unique(a))
    assert int(a.min()) >= 0 and int(a.max()) < N


def test_sample_rows_draws_what_randperm_drew_up_to_the_threshold():
    """Corpora up to RANDPERM_MAX_ROWS (SciFact's 5,183 documents) get the rows earlier runs got."""
    for N in (5183, RANDPERM_MAX_ROWS):
        torch.manual_seed(3)
        a = sample_rows(N, 512)
        torch.manual_seed(3)
        assert torch.equal(a, torch.randperm(N)[:512])


def test_sample_rows_above_the_threshold_is_uniform_over_rows_and_positions():
    """The O(n) draw (N > RANDPERM_MAX_ROWS): over 600 draws of 100 rows of 70,000 every block of
    1,000 rows is hit about 857 times, and the first row of a draw is no likelier to be small
    than large (a draw that kept sorted order, or favoured early ids, fails)."""
    N, n, reps = 70_000, 100, 600
    assert N > RANDPERM_MAX_ROWS
    torch.manual_seed(1)
    draws = torch.stack([sample_rows(N, n) for _ in range(reps)])
    counts = np.bincount(draws.numpy().ravel() // 1000, minlength=70)
    expected = reps * n / 70
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 69 + 5 * np.sqrt(2 * 69)  # 69 degrees of freedom, 5 sigma
    first = draws[:, 0].numpy()
    assert abs(float(np.mean(first < N / 2)) - 0.5) < 0.1
    assert not bool((draws[:, 1:] > draws[:, :-1]).all(dim=1).any())  # never in sorted order


def test_a_diverged_step_raises_before_it_updates_anything():
    """The trainer's kernels skip their NaN scans (check=False: each waited for the device), so
    the step itself refuses a non-finite loss, before the optimizer moves any parameter."""
    trainer = make_trainer("jpq", epochs=1)
    batch = trainer._batches(np.random.default_rng(0))[0]
    with torch.no_grad():
        trainer.encoder.linear.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in (trainer.centroids, *trainer.encoder.parameters())]
    with pytest.raises(FloatingPointError, match="diverged; lower lr_encoder"):
        trainer.step(batch)
    after = [p.detach() for p in (trainer.centroids, *trainer.encoder.parameters())]
    for a, b in zip(before, after):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def test_demo_paired_comparisons_and_table():
    from jpq.demo import paired_comparisons, results_table

    qids = [f"q{i}" for i in range(50)]
    rng = np.random.default_rng(0)
    base = {m: {q: float(v) for q, v in zip(qids, rng.random(50))} for m in ("ndcg@10", "mrr@10", "recall@100")}
    shifted = {m: {q: v + 0.1 for q, v in vals.items()} for m, vals in base.items()}
    per_q = {"jpq@32": shifted, "opq@32": base, "uncompressed-trained@1": shifted,
             "jpq@96": shifted}  # no opq@96, jpq-centroids@*: rows without per-query values
    records = [{"method": "jpq", "ratio": 32}, {"method": "jpq", "ratio": 96}, {"method": "opq", "ratio": 32}]
    paired = paired_comparisons(records, per_q, resamples=200)
    got = {(p["ratio"], p["versus"], p["metric"]): p for p in paired}
    assert {k[:2] for k in got} == {(32, "opq"), (32, "uncompressed-trained"), (96, "uncompressed-trained")}
    np.testing.assert_allclose([got[(32, "opq", "ndcg@10")]["difference"], *got[(32, "opq", "ndcg@10")]["ci95"]],
                               0.1, atol=1e-12)
    assert got[(96, "uncompressed-trained", "mrr@10")]["ci95"] == [0.0, 0.0]
    rows = [{"method": m, "ratio": r, "ndcg@10": 0.5, "mrr@10": 0.4, "recall@100": 0.9, "train_seconds": 1.0}
            for m, r in (("uncompressed-trained", 1), ("opq", 32), ("jpq", 32), ("jpq", 96))]
    table = results_table(rows, "x", paired)
    part = table.split("JPQ minus each method")[1]
    assert "| ratio | JPQ - opq | JPQ - uncompressed-trained |" in part  # no jpq-centroids values: no column
    assert "| 32x | +0.1000 [+0.1000, +0.1000] | +0.0000 [+0.0000, +0.0000] |" in part
    assert "| 96x | - | +0.0000 [+0.0000, +0.0000] |" in part
    assert "JPQ minus" not in results_table(rows, "x", [])


def test_an_extra_loss_term_from_a_subclass_enters_each_step_and_train_run_builds_that_class():
    """`JPQTrainer._extra_loss` (None: nothing) is the hook experiments add a term through
    (bench/teacher_distill.py); train_run(trainer_class=...) builds that subclass."""
    from jpq.pipeline import train_run

    seen = []

    class Extra(JPQTrainer):
        def _extra_loss(self, ids, cand, valid, logits):
            seen.append((len(ids), cand.shape, valid.shape, logits.shape))
            return 1e3 * logits[valid].mean()  # pushes every candidate's score down: a large effect

    plain, extra = make_trainer("jpq"), make_trainer("jpq")
    extra.__class__ = Extra
    batch = plain._batches(np.random.default_rng(0))[0]
    torch.manual_seed(0)
    base = plain.step(batch)
    torch.manual_seed(0)
    got = extra.step(batch)
    assert seen == [(len(batch), seen[0][1], seen[0][1], seen[0][1])] and seen[0][1][0] == len(batch)
    assert got["rank_loss"] == pytest.approx(base["rank_loss"]) and got["loss"] != pytest.approx(base["loss"])
    assert not torch.allclose(plain.centroids, extra.centroids)

    ws = toy_workspace()
    index = jpq.PQIndex(16, 4, nbits=4, metric="ip")
    index.train(ws.doc_emb, niter=10, seed=0)
    index.add(ws.doc_emb)
    cfg = TrainConfig(mode="jpq", epochs=1, batch_size=32, negatives=20, patience=1)
    trainer, _, _ = train_run(ws, cfg, index, None, progress=False, select_only=True, trainer_class=Extra)
    assert type(trainer) is Extra and len(seen) > 1


def test_an_index_with_ids_trains_and_validates_by_row_as_one_without():
    """The trainer addresses documents by row: an index built with add_with_ids (search returns
    the caller's ids) trains, validates and guards exactly as the same index without them, and
    its trained index keeps the ids."""
    X, Q, ids, qrels = synthetic_task(0)
    plain = jpq.PQIndex(X.shape[1], 4, nbits=4, metric="ip")
    plain.train(X, niter=10, seed=0)
    plain.add(X)
    mapped = copy.copy(plain)
    mapped.reset()
    mapped.add_codes(plain.codes, ids=np.arange(len(X)) * 7 + 1000)
    cfg = TrainConfig(mode="centroids", epochs=2, batch_size=32, negatives=20, lr_centroids=5e-3, patience=2)
    runs = []
    for index in (plain, mapped):
        t = JPQTrainer(cfg, X, index, ids, qrels, query_embeddings={q: Q[i] for i, q in enumerate(ids)},
                       progress=False)
        before = t.evaluate_ids(t.val_ids, index=index)
        t.fit()
        runs.append((before, t.state.history, t.trained_index()))
    assert runs[0][0] == runs[1][0] and runs[0][0]["ndcg@10"] > 0  # rows, not ids, were compared with qrels
    assert [h["val"] for h in runs[0][1]] == [h["val"] for h in runs[1][1]]
    np.testing.assert_array_equal(runs[0][2].centroids, runs[1][2].centroids)
    np.testing.assert_array_equal(runs[1][2].ids, mapped.ids)


def test_evaluate_vectors_refuses_an_index_whose_positions_are_not_the_corpus_rows():
    """Test metrics map result positions to corpus ids: an index with ids of its own, or with
    another number of vectors, would be scored against the wrong documents (0.0, silently)."""
    from jpq.pipeline import evaluate_vectors

    ws = toy_workspace()
    ws.dataset.qrels["test"] = {q: rel for q, rel in list(ws.dataset.qrels["train"].items())[:20]}
    ids = list(ws.dataset.qrels["test"])
    q = ws.query_emb[ws.query_rows(ids)]
    index = jpq.PQIndex(ws.doc_emb.shape[1], 4, nbits=4)
    index.train(ws.doc_emb, niter=5)
    index.add(ws.doc_emb)
    plain = evaluate_vectors(ws, q, index, ids)
    assert plain["recall@100"] > 0
    mapped = copy.copy(index)
    mapped.reset()
    mapped.add_codes(index.codes, ids=np.arange(index.ntotal))
    with pytest.raises(ValueError, match="under ids of their own"):
        evaluate_vectors(ws, q, mapped, ids)
    short = copy.copy(index)
    short.codes = index.codes[:-1]
    with pytest.raises(ValueError, match=f"holds {index.ntotal - 1} vectors; .*needs one vector per corpus document"):
        evaluate_vectors(ws, q, short, ids)


def test_demo_settings_bind_the_judgments_too():
    """A demo folder's rows were scored against its test judgments: a resumed demo whose qrels
    differ (edited, or judgments of missing documents now kept) is another table."""
    from jpq.demo import _settings

    ws = toy_workspace()
    ws.dataset.qrels["test"] = {"q0": {"d1": 1}}
    before = _settings(ws, TrainConfig(), [1e-4], [0.0])
    assert before == _settings(ws, TrainConfig(), [1e-4], [0.0])
    ws.dataset.unmatched_qrels["test"] = {"q0": {"gone": 1}}
    after = _settings(ws, TrainConfig(), [1e-4], [0.0])
    assert after["judgments"] != before["judgments"] and after["dataset"] == before["dataset"]
