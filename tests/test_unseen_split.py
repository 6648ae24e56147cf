"""bench/unseen_split.py: the derived BEIR folder keeps the corpus, queries and test judgments, and
no training query of it points to a test positive."""
import importlib.util

import pytest

from conftest import REPO_ROOT
from jpq.data import load_beir, make_synthetic_beir


def _module():
    spec = importlib.util.spec_from_file_location("unseen_split", REPO_ROOT / "bench" / "unseen_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_derived_train_split_shares_no_positive_with_test(tmp_path):
    source = make_synthetic_beir(tmp_path / "src", n_docs=200, n_queries=90, seed=3)
    counts = _module().derive(source, tmp_path / "out")
    src, out = load_beir(source), load_beir(tmp_path / "out")
    assert out.corpus_ids == src.corpus_ids and out.query_ids == src.query_ids
    assert out.qrels["test"] == src.qrels["test"]
    test_pos = {d for rel in src.qrels["test"].values() for d in rel}
    kept = out.qrels["train"]
    assert all(not (set(rel) & test_pos) for rel in kept.values())
    # every source training query without a test positive is kept, with its judgments unchanged
    expected = {q: rel for q, rel in src.qrels["train"].items() if not (set(rel) & test_pos)}
    assert kept == expected
    assert counts["kept_train_queries"] == len(expected) > 0
    assert counts["dropped_train_queries"] == len(src.qrels["train"]) - len(expected) > 0


def test_derive_refuses_a_train_split_with_nothing_left(tmp_path):
    source = make_synthetic_beir(tmp_path / "src", n_docs=50, n_queries=30, seed=0)
    test = (source / "qrels" / "test.tsv").read_text()
    (source / "qrels" / "train.tsv").write_text(test)  # every training query now has a test positive
    with pytest.raises(ValueError, match="nothing to train on"):
        _module().derive(source, tmp_path / "out")


def test_derived_test_judgments_keep_those_of_documents_missing_from_the_corpus(tmp_path):
    """"The test qrels stay as they are": also a judgment of a document the corpus lacks, which
    the loader keeps for evaluation."""
    source = make_synthetic_beir(tmp_path / "src", n_docs=200, n_queries=90, seed=3)
    judged = next(iter(load_beir(source).qrels["test"]))
    with open(source / "qrels" / "test.tsv", "a") as f:
        f.write(f"{judged}\tno-such-doc\t1\n")
    _module().derive(source, tmp_path / "out")
    src, out = load_beir(source), load_beir(tmp_path / "out")
    assert out.evaluation_qrels("test") == src.evaluation_qrels("test")
    assert out.unmatched_qrels["test"][judged] == {"no-such-doc": 1}
