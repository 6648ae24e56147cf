"""The helpers the held-out experiment scripts share (bench/machine.py), the weight mixing of
bench/weight_interpolation.py, and the code re-encoding of bench/code_reassign.py."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from jpq.train import TrainState


def _bench_module(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts bench/ on sys.path, so `machine` imports too
    return module


def test_selection_record_cells_means_and_report(tmp_path):
    _bench_module("weight_interpolation")  # bench/ on sys.path
    import machine

    history = [{"epoch": 0, "val": 0.5, "val_unseen": [0.2, 0.4]},
               {"epoch": 1, "val": 0.7, "val_unseen": 0.35}, {"epoch": 2, "val": 0.6, "val_unseen": 0.1}]
    sel = TrainState(epoch=2, best_epoch=1, best_score=0.7, history=history)
    rec = machine.selection_record(sel, 12.4, seed=3, weight=1.0)
    assert rec == {"seed": 3, "weight": 1.0, "val": 0.7, "epoch": 1, "val_unseen": 0.35, "seconds": 12.4,
                   "curve": [0.5, 0.7, 0.6]}
    assert machine.selection_cells(rec) == "0.7000 (1) | 0.3500 | 12"
    lines, records = [], []
    machine.add_selection_row(lines, records, "3 | 1", sel, 12.4, seed=3, weight=1.0)
    assert records == [rec] and lines == ["| 3 | 1 | 0.7000 (1) | 0.3500 | 12 |"]
    # epoch 0 keeps the per-query list: its mean is reported; no guard: "-"
    at0 = machine.selection_record(TrainState(best_epoch=0, best_score=0.5, history=history[:1]), 1.0)
    assert at0["val_unseen"] == pytest.approx(0.3)
    assert machine.selection_cells({**at0, "val_unseen": None}).split(" | ")[1] == "-"
    recs = [rec, {**rec, "val": 0.5}, {**rec, "weight": 0.0, "val": 0.4}]
    assert machine.mean_lines(recs, "weight", "Means:") == ["", "Means:", "- 1: 0.6000 (0.7000, 0.5000)",
                                                            "- 0: 0.4000 (0.4000)"]
    out = tmp_path / "report.md"
    machine.write_report(out, ["# title"], recs, "bench/some_script.py", ["--seeds", "0"], 0.0)
    text = out.read_text()
    assert text.startswith("# title\n\nCommand: `python bench/some_script.py --seeds 0` (")
    assert json.loads(out.with_suffix(".json").read_text()) == recs


def test_mix_states_interpolates_float_weights_and_keeps_the_rest():
    wi = _bench_module("weight_interpolation")
    start = {"centroids": torch.zeros(2, 3), "codes": None,
             "encoder": {"w": torch.zeros(2), "ids": torch.tensor([0, 1])}}
    end = {"centroids": torch.ones(2, 3) * 4, "codes": "codes",
           "encoder": {"w": torch.tensor([2.0, -2.0]), "ids": torch.tensor([5, 6])}}
    mixed = wi.mix_states(start, end, 0.25)
    torch.testing.assert_close(mixed["centroids"], torch.ones(2, 3))
    torch.testing.assert_close(mixed["encoder"]["w"], torch.tensor([0.5, -0.5]))
    assert torch.equal(mixed["encoder"]["ids"], end["encoder"]["ids"]) and mixed["codes"] == "codes"
    assert wi.mix_states(start, {**end, "encoder": None}, 0.5)["encoder"] is None


def test_epoch_states_and_code_reassignment_variants():
    from test_train import make_trainer

    cr = _bench_module("code_reassign")
    import machine

    base = make_trainer(mode="jpq", epochs=2)
    kept = machine.epoch_states_trainer()(base.cfg, base.X, base.index, base.train_ids + base.val_ids, base.qrels,
                                          query_texts=base.query_texts, query_embeddings=base.query_embeddings,
                                          encoder=base.encoder, progress=False)
    kept.fit()
    assert sorted(kept.epoch_states) == [0, 1, 2]
    assert not torch.equal(kept.epoch_states[0]["centroids"], kept.epoch_states[2]["centroids"])
    state = kept.epoch_states[2]
    variants = cr.reassigned_codes(kept, state)
    assert variants["fixed"] is state["codes"]
    index = kept.trained_index()
    index.centroids = state["centroids"].numpy()
    fresh = index.encode(kept.X)
    np.testing.assert_array_equal(variants["all"], fresh)
    unseen = variants["unseen"]
    positives = sorted({d for q in kept.train_ids for d in kept.qrels[q]})
    others = np.setdiff1d(np.arange(len(kept.X)), positives)
    np.testing.assert_array_equal(unseen[positives], state["codes"][positives])
    np.testing.assert_array_equal(unseen[others], fresh[others])
    assert (fresh != state["codes"]).any()  # trained centroids move some documents' nearest code


def test_average_states_means_float_weights_and_keeps_the_rest():
    soup = _bench_module("refit_soup_nested")
    states = [{"centroids": torch.full((2, 3), v), "codes": "codes",
               "encoder": {"w": torch.tensor([v, -v]), "ids": torch.tensor([int(v), 1])}} for v in (1.0, 2.0, 6.0)]
    mean = soup.average_states(states)
    torch.testing.assert_close(mean["centroids"], torch.full((2, 3), 3.0))
    torch.testing.assert_close(mean["encoder"]["w"], torch.tensor([3.0, -3.0]))
    assert torch.equal(mean["encoder"]["ids"], states[-1]["encoder"]["ids"]) and mean["codes"] == "codes"
    assert soup.average_states([{**s, "encoder": None} for s in states])["encoder"] is None
    # averaging one state's copies gives it back
    torch.testing.assert_close(soup.average_states(states[:1] * 2)["centroids"], states[0]["centroids"])


def test_decayed_trainer_lowers_both_rates_linearly_per_epoch():
    from test_train import make_trainer

    sched = _bench_module("refit_schedule_nested")
    base = make_trainer(mode="jpq", epochs=4)
    seen = []

    class Recording(sched.decayed_trainer()):
        def step(self, ids):
            seen.append(tuple(g["lr"] for g in self.optimizer.param_groups))
            return super().step(ids)

    t = Recording(base.cfg, base.X, base.index, base.train_ids + base.val_ids, base.qrels,
                  query_texts=base.query_texts, query_embeddings=base.query_embeddings, encoder=base.encoder,
                  progress=False)
    initial = [g["lr"] for g in t.optimizer.param_groups]
    assert len(initial) == 2  # centroids and query tower
    t.fit()
    per_epoch = sorted(set(seen), reverse=True)
    assert len(per_epoch) == t.state.epoch  # one pair of rates per epoch run
    for e, rates in enumerate(per_epoch, start=1):
        assert rates == pytest.approx([lr * (4 - e + 0.5) / 4 for lr in initial])


def test_outer_score_rows_show_missing_variants_and_average_complete_runs():
    _bench_module("refit_soup_nested")  # bench/ on sys.path
    import machine

    res = {"s0": {"epoch": 3, "a": {"all": 0.5, "unseen": 0.25}, "b": {"all": 0.7, "unseen": 0.5}},
           "s1": {"epoch": 5, "a": {"all": 0.7, "unseen": 0.75}, "b": {"all": 0.9, "unseen": 0.5}},
           "s2": {"epoch": 0, "a": {"all": 0.1, "unseen": 0.0}}}
    assert machine.outer_score_rows(res, ("a", "b")) == [
        "| s0 | 3 | 0.5000 / 0.2500 | 0.7000 / 0.5000 |",
        "| s1 | 5 | 0.7000 / 0.7500 | 0.9000 / 0.5000 |",
        "| s2 | 0 | 0.1000 / 0.0000 | - |",
        "| mean (2) | | 0.6000 / 0.5000 | 0.8000 / 0.5000 |"]
    assert machine.outer_score_rows({"s2": res["s2"]}, ("a", "b")) == ["| s2 | 0 | 0.1000 / 0.0000 | - |"]


def test_field_rows_average_both_refits_over_seeds_with_every_value():
    bench = _bench_module("field_nested")

    def run(a, b, epoch=3):
        return {"epoch": epoch, "selected": {"all": 0.0, "unseen": 0.0},
                "refit": {"all": a, "unseen": a / 2}, "refit'": {"all": b, "unseen": b / 2}}

    key = bench.run_key
    # lr_encoder keeps the keys of bench/tower_rate_nested.py's committed cache
    assert key(0, "jpq", 96, "lr_encoder", 2e-5) == "s0 96x lr 2e-05"
    assert key(1, "encoder", 96, "lr_encoder", 1e-5) == "s1 encoder lr 1e-05"
    assert key(2, "jpq", 64, "corpus_recon_weight", 1.0) == "s2 64x corpus_recon_weight 1"
    f = "lr_encoder"
    res = {key(0, "jpq", 96, f, 1e-5): run(0.7, 0.8), key(0, "jpq", 96, f, 2e-5): run(0.6, 0.6, 5),
           key(1, "jpq", 96, f, 1e-5): run(0.5, 0.5)}  # seed 1 lacks 2e-5: shown, not averaged
    rows = bench.value_rows(res, f, [1e-5, 2e-5], [0, 1], "jpq", 96)
    assert rows[0].startswith("| lr_encoder | seed 0 | seed 1 |")
    assert rows[2] == "| 1e-05 | 0.7500 / 0.3750 | 0.5000 / 0.2500 | 0.7500 / 0.3750 | 3, 3 |"
    assert rows[3] == "| 2e-05 | 0.6000 / 0.3000 | - | 0.6000 / 0.3000 | 5 |"
    cached = json.loads((REPO_ROOT / "bench" / "results" / "tower_rate_nested.json").read_text())
    assert key(0, "jpq", 96, f, 4e-5) in cached  # the wrapper reads the runs it cached before
    field_args = _bench_module("tower_rate_nested").field_args
    assert field_args(["--rates", "1e-5,2e-5", "--seeds", "0"]) == ["--values", "1e-5,2e-5", "--seeds", "0"]
    assert field_args(["--rates=1e-5"]) == ["--values=1e-5"]
    assert field_args(["--mode", "encoder"]) == ["--mode", "encoder", "--values", "1e-5,2e-5,4e-5"]


def test_opq_variants_rank_correlation():
    spearman = _bench_module("opq_variants").spearman
    assert spearman([0.1, 0.3, 0.2], [1.0, 3.0, 2.0]) == pytest.approx(1.0)
    assert spearman([0.1, 0.3, 0.2], [3.0, 1.0, 2.0]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)


def test_unseen_budget_adds_the_subsets_up_to_the_demo_rows_and_solves_for_the_target():
    """From the committed SciFact demo: the two subsets weigh back to results.json's rows (budget
    checks it), and scoring the needed value on the unseen queries gives exactly the target share."""
    module = _bench_module("unseen_budget")
    demo = REPO_ROOT / "bench" / "results" / "demo_scifact"
    r = module.budget(demo, 96, 0.97)
    assert (r["n_unseen"], r["n"]) == (104, 300)
    reached = (r["n_unseen"] * r["needed_unseen"] + (r["n"] - r["n_unseen"]) * r["jpq_seen"]) / r["n"]
    assert reached == pytest.approx(0.97 * r["ut"])
    rows = {x["method"]: x for x in json.loads((demo / "results.json").read_text()) if x["ratio"] in (1, 96)}
    assert r["share"] == pytest.approx(rows["jpq"]["ndcg@10"] / rows["uncompressed-trained"]["ndcg@10"], abs=2e-3)
    assert r["needed_unseen"] > r["jpq_unseen"]  # the split that misses the target
    assert "| demo_scifact (104 of 300) | 94.9% |" in module.report([r], 96, 0.97)


def test_pseudo_query_posthoc_training_moves_only_centroids_and_raises_self_retrieval():
    import jpq

    train_centroids = _bench_module("pseudo_query_posthoc").train_centroids
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 16)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    P = (X + 0.1 * rng.standard_normal(X.shape)).astype(np.float32)  # each document's pseudo-query
    index = jpq.PQIndex(16, 4, nbits=4, opq=True)
    index.train(X, niter=5, opq_iterations=2)
    index.add(X)

    def self_hits(ix):
        return float((ix.search(P, 1)[1][:, 0] == np.arange(len(X))).mean())

    for loss in ("ce", "kl"):
        scores = train_centroids(index, X, P, loss, 0.0, 4, 0, self_hits, lr=1e-2)
        assert sorted(scores) == [2, 4] and scores[4] > self_hits(index) + 0.05, (loss, scores, self_hits(index))
    with_recon = train_centroids(index, X, P, "ce", 10.0, 2, 0, lambda ix: ix.centroids.copy(), lr=1e-2)[2]
    assert with_recon.shape == index.centroids.shape and not np.array_equal(with_recon, index.centroids)
