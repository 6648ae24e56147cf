"""Tests for jpq.data: tiny BEIR folders built in tmp_path, the real SciFact when present."""
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jpq.data import BeirDataset, download_beir, load_beir, title_queries
from jpq.metrics import per_query

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
    # Score-0 rows stay in qrels (metrics decide relevance); unknown ids are left out of qrels, a known
    # query's judgment of a document the corpus lacks is kept for evaluation only.
    assert ds.qrels == {"test": {"q2": {"d1": 1}, "q1": {"d2": 2, "d3": 0}},
                        "train": {"q3": {"d3": 1}}}
    assert ds.unmatched_qrels == {"test": {"q1": {"unknown-doc": 1}}}
    assert ds.evaluation_qrels("test") == {"q2": {"d1": 1}, "q1": {"d2": 2, "d3": 0, "unknown-doc": 1}}
    assert ds.evaluation_qrels("train") is ds.qrels["train"]
    assert "2 of 5 qrels pairs name an unknown id (1 with an unknown query id, e.g. ['q9']; 1 with an unknown " \
           "corpus id, e.g. ['unknown-doc']); the 1 of known queries with a document missing from the corpus are " \
           "kept for evaluation" in caplog.text
    # queries.jsonl order, not qrels order
    assert ds.split_query_ids("test") == ["q1", "q2"]
    assert ds.split_query_ids("train") == ["q3"]
    assert ds.split_query_ids("test", evaluation=True) == ["q1", "q2"]
    with pytest.raises(ValueError, match="split='dev'"):
        ds.split_query_ids("dev")


def test_judgments_of_documents_missing_from_the_corpus_count_in_evaluation_as_pytrec_eval_counts_them(tmp_path):
    # q1 judges d1 (in the corpus) and gone (not); q2 judges only gone2: BEIR's loader keeps both queries
    # and pytrec_eval scores them on the raw file, so a perfect run has q1 Recall@100 1/2 and q2 0.
    root = write_beir(tmp_path / "gaps", qrels={"test": "q1\td1\t1\nq1\tgone\t1\nq2\tgone2\t1\nq2\td2\t0\n",
                                                 "train": TRAIN_TSV})
    ds = load_beir(root)
    assert ds.qrels["test"] == {"q1": {"d1": 1}, "q2": {"d2": 0}}  # training never sees the gaps
    assert ds.split_query_ids("test") == ["q1", "q2"]
    assert ds.evaluation_qrels("test") == {"q1": {"d1": 1, "gone": 1}, "q2": {"d2": 0, "gone2": 1}}
    run = (np.array([[0, 1, 2], [1, 0, 2]]), ["q1", "q2"], ds.corpus_ids)
    values = per_query(run, ds.evaluation_qrels("test"), ("recall@100", "ndcg@10", "mrr@10"))
    assert values["recall@100"] == {"q1": 0.5, "q2": 0.0}
    assert values["ndcg@10"]["q1"] == pytest.approx(1 / (1 + 1 / np.log2(3)))  # ideal DCG holds both documents
    assert values["mrr@10"] == {"q1": 1.0, "q2": 0.0}
    # a query whose only judgment names a missing document is still a test query (scored 0)
    root = write_beir(tmp_path / "only-gap", qrels={"test": "q1\td1\t1\nq3\tgone\t1\n", "train": TRAIN_TSV})
    ds = load_beir(root)
    assert ds.split_query_ids("test") == ["q1"] and ds.split_query_ids("test", evaluation=True) == ["q1", "q3"]


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
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_words must be an int >= 1"):
            title_queries(ds, max_words=bad)
    short = BeirDataset(["a", "b"], ["One.", "Two."], [], [], {}, "short", "-", corpus_titles=["only one"])
    with pytest.raises(ValueError, match="1 titles for 2 documents"):
        title_queries(short)


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


@pytest.mark.parametrize("row", ["q1\td1", "q1\td1\tx", "q1\td1\t1.5"])
def test_malformed_qrels(tmp_path, row):
    root = write_beir(tmp_path / "tiny",
                      qrels={"test": "query-id\tcorpus-id\tscore\nq2\td1\t1\n" + row + "\n"})
    with pytest.raises(ValueError, match=r"test\.tsv:3"):
        load_beir(root)


def test_space_separated_qrels_get_a_hint(tmp_path):
    root = write_beir(tmp_path / "tiny", qrels={"test": "q1 0 d1 1\n"})
    with pytest.raises(ValueError, match=r"test\.tsv:1: .*separated by spaces\? a TREC qrels file"):
        load_beir(root)


@pytest.mark.parametrize("text", [
    "q2\td1\t1\nq1\td2\t2\n",  # no header
    "\ufeffq2\td1\t1\nq1\td2\t2\n",  # a byte order mark, no header: q2 is still q2
    "\ufeffquery_id\tdoc_id\trelevance\r\nq2\td1\t1\r\nq1\td2\t2\r\n",  # BOM, another header, CRLF
    "\nquery-id\tcorpus-id\tscore\nq2\td1\t1\textra\nq1\td2\t2\t\n",  # blank first line; extra columns
])
def test_qrels_variants_read_as_beir_reads_them(tmp_path, text):
    root = tmp_path / "tiny"
    write_beir(root, qrels={})
    (root / "qrels" / "test.tsv").write_bytes(text.encode("utf-8"))
    assert load_beir(root).qrels == {"test": {"q2": {"d1": 1}, "q1": {"d2": 2}}}


def test_judgments_of_another_corpus_are_an_error_not_an_empty_split(tmp_path):
    root = write_beir(tmp_path / "tiny", qrels={"test": "q1\tD1\t1\nQ2\td1\t1\n"})
    with pytest.raises(ValueError, match=r"test\.tsv: none of its 2 pairs .*unknown query id, e.g. \['Q2'\].*"
                                         r"unknown corpus id, e.g. \['D1'\]"):
        load_beir(root)


def test_gzipped_files_and_byte_order_marks_are_read(tmp_path):
    import gzip

    plain = load_beir(write_beir(tmp_path / "plain"))
    root = write_beir(tmp_path / "gz")
    for name in ("corpus.jsonl", "qrels/test.tsv"):
        data = (root / name).read_bytes()
        (root / name).unlink()
        (root / f"{name}.gz").write_bytes(gzip.compress(data))
    (root / "queries.jsonl").write_bytes(b"\xef\xbb\xbf" + (root / "queries.jsonl").read_bytes())
    ds = load_beir(root)
    assert (ds.corpus_ids, ds.corpus_texts, ds.query_ids, ds.qrels) == \
           (plain.corpus_ids, plain.corpus_texts, plain.query_ids, plain.qrels)
    assert load_beir(root, splits=["test"]).qrels == {"test": plain.qrels["test"]}


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    root = write_beir(tmp_path / "tiny")
    with open(root / "corpus.jsonl", "ab") as f:
        f.write('{"_id": "d4", "text": "caf\u00e9"}\n'.encode("cp1252"))
    with pytest.raises(ValueError, match=r"corpus\.jsonl:4: not UTF-8 text \(byte 0xe9"):
        load_beir(root)


@pytest.mark.parametrize("line, message", [
    ({"_id": None, "text": "x"}, "'_id' must be a string, got null"),
    ({"_id": " ", "text": "x"}, "'_id' must be a non-empty string"),
    ({"_id": "d4", "text": {"a": 1}}, "'text' must be a string"),
    ({"_id": "d4", "title": ["t"], "text": "x"}, "'title' must be a string"),
    (["d4", "x"], "a JSON list, not an object"),
])
def test_ids_and_texts_must_be_strings(tmp_path, line, message):
    root = write_beir(tmp_path / "tiny", corpus=CORPUS + [line])
    with pytest.raises(ValueError, match=r"corpus\.jsonl:4: malformed line .*" + message.replace("[", r"\[")):
        load_beir(root)
    numeric = load_beir(write_beir(tmp_path / "n", corpus=CORPUS + [{"_id": 4, "text": 5}]))
    assert numeric.corpus_ids[-1] == "4" and numeric.corpus_texts[-1] == "5"  # numbers are written out


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


def test_synthetic_folder_arguments_are_checked(tmp_path):
    from jpq.data import make_synthetic_beir

    for kw, message in [({"n_docs": 0}, "n_docs must be"), ({"n_queries": 1}, "n_queries must be"),
                        ({"test_fraction": 1.0}, "test_fraction must leave both splits"),
                        ({"test_fraction": -0.5}, "test_fraction must leave both splits")]:
        with pytest.raises(ValueError, match=message):
            make_synthetic_beir(tmp_path / "s", **kw)
    make_synthetic_beir(tmp_path / "s", n_docs=50, n_queries=20)
    make_synthetic_beir(tmp_path / "s", n_docs=50, n_queries=20, seed=1)  # rewriting its own files is fine
    (tmp_path / "s" / "qrels" / "dev.tsv").write_text("q0\td0\t1\n")
    with pytest.raises(ValueError, match=r"already holds \['dev.tsv'\]"):
        make_synthetic_beir(tmp_path / "s", n_docs=50, n_queries=20)
