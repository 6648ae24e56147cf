"""Tests for jpq.data: tiny BEIR folders built in tmp_path, the real SciFact when present."""
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jpq.data import BeirDataset, download_beir, load_beir, title_queries

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"

CORPUS = [
    {"_id": "d1", "title": "Title one", "text": "Body one. "},
    {"_id": "d2", "title": "", "text": " no title here"},  # empty title -> just the text
    {"_id": "d3", "text": "missing title key"},
]
QUERIES = [{"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second"},
           {"_id": "q3", "text": "third"}]
TEST_TSV = "query-id\tcorpus-id\tscore\nq2\td1\t1\nq1\td2\t2\nq1\td3\t0\n" \
           "q1\tunknown-doc\t1\nq9\td1\t1\n"  # two pairs with unknown ids
TRAIN_TSV = "query-id\tcorpus-id\tscore\nq3\td3\t1\n"


def write_beir(root: Path, corpus=CORPUS, queries=QUERIES, qrels=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    if qrels is None:
        qrels = {"test": TEST_TSV, "train": TRAIN_TSV}
    for split, text in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text(text)
    return root


def test_load_tiny(tmp_path, caplog):
    root = write_beir(tmp_path / "tiny")
    with caplog.at_level(logging.WARNING, logger="jpq.data"):
        ds = load_beir(root)
    assert isinstance(ds, BeirDataset)
    assert ds.name == "tiny" and ds.path == str(root)
    assert ds.corpus_ids == ["d1", "d2", "d3"]
    assert ds.corpus_texts == ["Title one Body one.", "no title here", "missing title key"]
    assert ds.corpus_titles == ["Title one", "", ""]
    assert ds.query_ids == ["q1", "q2", "q3"] and ds.query_texts == ["first?", "second", "third"]
    # Score-0 rows stay in qrels (metrics decide relevance); unknown ids are dropped.
    assert ds.qrels == {"test": {"q2": {"d1": 1}, "q1": {"d2": 2, "d3": 0}},
                        "train": {"q3": {"d3": 1}}}
    assert "dropped 2 qrels pair(s)" in caplog.text
    # queries.jsonl order, not qrels order
    assert ds.split_query_ids("test") == ["q1", "q2"]
    assert ds.split_query_ids("train") == ["q3"]
    with pytest.raises(ValueError, match="split='dev'"):
        ds.split_query_ids("dev")


def test_title_queries_take_the_title_else_the_first_sentence(tmp_path):
    corpus = CORPUS + [{"_id": "d4", "title": "  ", "text": "First claim holds!  Second one.\nThird"},
                       {"_id": "d5", "text": "word " * 50}]
    ds = load_beir(write_beir(tmp_path / "t", corpus=corpus))
    assert title_queries(ds) == ["Title one", "no title here", "missing title key", "First claim holds!",
                                 " ".join(["word"] * 32)]
    assert title_queries(ds, max_words=2)[3] == "First claim"
    # a dataset built without titles uses the first sentences
    bare = BeirDataset(["a"], ["One. Two."], [], [], {}, "bare", "-")
    assert title_queries(bare) == ["One."]


def test_index_lookups(tmp_path):
    ds = load_beir(write_beir(tmp_path / "tiny"))
    idx = ds.doc_index(["d3", "d1"])
    assert idx.dtype == np.int64 and idx.tolist() == [2, 0]
    assert ds.query_index(ds.split_query_ids("test")).tolist() == [0, 1]
    assert ds.doc_index([]).shape == (0,)
    with pytest.raises(ValueError, match="unknown document"):
        ds.doc_index(["d1", "nope"])
    with pytest.raises(TypeError, match="ids"):
        ds.query_index("q1")


def test_fingerprint(tmp_path):
    a = load_beir(write_beir(tmp_path / "a"))
    b = load_beir(write_beir(tmp_path / "b"))  # same content, other folder
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    changed = [dict(d) for d in CORPUS]
    changed[1]["text"] = "other"
    c = load_beir(write_beir(tmp_path / "c", corpus=changed))
    assert c.fingerprint("corpus") != a.fingerprint("corpus")
    assert c.fingerprint("queries") == a.fingerprint("queries")
    assert c.fingerprint() != a.fingerprint()
    with pytest.raises(ValueError, match="part"):
        a.fingerprint("qrels")


def test_lone_surrogates_are_replaced_on_load(tmp_path):
    """Crawled corpora hold JSON escapes of half an emoji ("\\ud83d" alone): such text cannot be
    encoded, hashed or tokenized, so loading replaces the lone surrogate by "?"."""
    root = write_beir(tmp_path / "s")
    (root / "corpus.jsonl").write_text('{"_id": "d1", "title": "t \\ud83d", "text": "bad \\ud83d here"}\n'
                                       '{"_id": "d2", "text": "fine \\ud83d\\ude00"}\n'
                                       '{"_id": "d3", "text": "x"}\n')
    ds = load_beir(root)
    assert ds.corpus_texts[0] == "t ? bad ? here" and ds.corpus_titles[0] == "t ?"
    assert ds.corpus_texts[1] == "fine \U0001f600"  # a valid pair stays the emoji
    assert len(ds.fingerprint()) == 64


def test_splits_argument(tmp_path):
    root = write_beir(tmp_path / "tiny")
    assert list(load_beir(root, splits=["train"]).qrels) == ["train"]
    assert load_beir(root, splits=[]).qrels == {}
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        load_beir(root, splits=["dev"])
    with pytest.raises(TypeError, match="splits"):
        load_beir(root, splits="test")


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl"])
def test_missing_file(tmp_path, missing):
    root = write_beir(tmp_path / "tiny")
    (root / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_beir(root)


def test_missing_qrels(tmp_path):
    root = write_beir(tmp_path / "tiny", qrels={})
    with pytest.raises(FileNotFoundError, match="qrels"):
        load_beir(root)


def test_malformed_json_line(tmp_path):
    root = write_beir(tmp_path / "tiny")
    with open(root / "corpus.jsonl", "a") as f:
        f.write("\n")  # blank lines are skipped: the bad one below is line 5
        f.write('{"_id": "d4", "text": oops}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:5"):
        load_beir(root)


def test_missing_id_and_duplicate(tmp_path):
    root = write_beir(tmp_path / "a", queries=QUERIES + [{"text": "no id"}])
    with pytest.raises(ValueError, match=r"queries\.jsonl:4"):
        load_beir(root)
    root = write_beir(tmp_path / "b", corpus=CORPUS + [CORPUS[0]])
    with pytest.raises(ValueError, match=r"corpus\.jsonl:4: duplicate"):
        load_beir(root)


@pytest.mark.parametrize("row", ["q1\td1", "q1\td1\tx", "q1\td1\t1\textra"])
def test_malformed_qrels(tmp_path, row):
    root = write_beir(tmp_path / "tiny",
                      qrels={"test": "query-id\tcorpus-id\tscore\nq2\td1\t1\n" + row + "\n"})
    with pytest.raises(ValueError, match=r"test\.tsv:3"):
        load_beir(root)


def test_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="not-a-dataset"):
        load_beir(tmp_path / "not-a-dataset", cache_dir=tmp_path)


def make_zip(tmp_path: Path, name: str) -> str:
    """A fake `{name}.zip` laid out like the BEIR archives; returns a file:// base URL."""
    src = write_beir(tmp_path / "src" / name)
    (tmp_path / "zips").mkdir()
    with zipfile.ZipFile(tmp_path / "zips" / f"{name}.zip", "w") as z:
        for f in src.rglob("*"):
            z.write(f, f.relative_to(src.parent).as_posix())
    return (tmp_path / "zips").as_uri() + "/{name}.zip"


def test_download_file_url(tmp_path):
    base = make_zip(tmp_path, "scifact")
    cache = tmp_path / "cache"
    ds = load_beir("scifact", cache_dir=cache, base_url=base, progress=False)
    assert ds.name == "scifact" and ds.path == str(cache / "scifact")
    assert ds.corpus_ids == ["d1", "d2", "d3"]
    # Nothing left over: no partial archive, no temporary extraction folder.
    assert sorted(p.name for p in cache.iterdir()) == ["scifact"]
    # A second call reuses the folder without touching the (now broken) URL.
    again = load_beir("scifact", cache_dir=cache, base_url="file:///nonexistent/{name}.zip",
                      progress=False)
    assert again.fingerprint() == ds.fingerprint()


def test_download_failure(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="could not download.*local folder"):
        download_beir("nfcorpus", cache, base_url=(tmp_path / "none").as_uri() + "/{name}.zip",
                      progress=False)
    assert list(cache.iterdir()) == []  # no half-written dataset


def test_download_bad_zip(tmp_path):
    (tmp_path / "fiqa.zip").write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="could not download"):
        download_beir("fiqa", tmp_path / "cache", base_url=tmp_path.as_uri() + "/{name}.zip",
                      progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.skipif(not SCIFACT.is_dir(), reason=f"real SciFact not found at {SCIFACT}")
def test_real_scifact():
    ds = load_beir(SCIFACT)
    assert len(ds.corpus_ids) == len(ds.corpus_texts) == 5183
    assert len(ds.query_ids) == len(ds.query_texts) == 1109
    for split, n_queries, n_pairs in (("train", 809, 919), ("test", 300, 339)):
        qrels = ds.qrels[split]
        assert len(qrels) == n_queries
        assert sum(len(d) for d in qrels.values()) == n_pairs
        assert len(ds.split_query_ids(split)) == n_queries
    assert all(ds.corpus_texts) and all(ds.query_texts)
