"""Load retrieval datasets in BEIR layout (local folder or the public BEIR archive).

A BEIR folder holds::

    corpus.jsonl     one JSON object a line: {"_id": str, "title": str, "text": str}
    queries.jsonl    one JSON object a line: {"_id": str, "text": str}
    qrels/<split>.tsv  header "query-id<TAB>corpus-id<TAB>score", then one pair a line

`load_beir("path/to/scifact")` reads a folder; `load_beir("scifact")` (a known BEIR name
that is not an existing folder) downloads the archive once into `~/.cache/jpq/beir`.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
DEFAULT_CACHE_DIR = Path("~/.cache/jpq/beir")

# Public BEIR archives. "cqadupstack" unzips into one folder per forum: load it as
# "cqadupstack/android", "cqadupstack/english", ...
BEIR_DATASETS = frozenset({
    "msmarco", "trec-covid", "nfcorpus", "nq", "hotpotqa", "fiqa", "arguana",
    "webis-touche2020", "cqadupstack", "quora", "dbpedia-entity", "scidocs", "fever",
    "climate-fever", "scifact",
})


@dataclass
class BeirDataset:
    """A retrieval dataset: corpus, queries and relevance judgments per split.

    Attributes:
        corpus_ids: document ids, in corpus.jsonl order; row i of a document-embedding
            matrix is document `corpus_ids[i]`.
        corpus_texts: `title + " " + text`, stripped (just `text` when there is no title).
        query_ids: query ids, in queries.jsonl order.
        query_texts: query texts, stripped.
        qrels: split name -> {query_id: {doc_id: relevance}}. Rows with relevance <= 0 are
            kept; metrics count a document as relevant when its relevance is > 0.
        name: the dataset's name (the folder name).
        path: the folder it was read from.
        corpus_titles: each document's title, stripped ("" when it has none), in corpus order;
            empty when the dataset was built without titles.
        unmatched_qrels: split name -> {query_id: {doc_id: relevance}} for judgments of known
            queries whose document is not in the corpus. They are kept out of `qrels` (nothing
            can retrieve or train on them) but `evaluation_qrels` adds them back, so metrics
            count them as pytrec_eval on the raw qrels file (and BEIR's EvaluateRetrieval) do.
    """

    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, dict[str, int]]]
    name: str
    path: str
    corpus_titles: list[str] = field(default_factory=list)
    unmatched_qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    _doc_rows: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)
    _query_rows: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)
    _fingerprints: dict[str, str] = field(default_factory=dict, init=False, repr=False,
                                          compare=False)

    def split_query_ids(self, split: str, evaluation: bool = False) -> list[str]:
        """Ids of the queries judged in `split`, in queries.jsonl order; with `evaluation`, also
        those whose only judgments name documents missing from the corpus (`evaluation_qrels`)."""
        judged = self.evaluation_qrels(split) if evaluation else self._split(split)
        return [qid for qid in self.query_ids if qid in judged]

    def evaluation_qrels(self, split: str) -> dict[str, dict[str, int]]:
        """`qrels[split]` plus `unmatched_qrels[split]`: the split's judgments as its qrels file
        has them (of known queries), what test metrics are computed against, so Recall and nDCG
        count a judged document the corpus lacks as relevant and never retrieved."""
        qrels, extra = self._split(split), self.unmatched_qrels.get(split, {})
        if not extra:
            return qrels
        merged = {q: dict(rel) for q, rel in qrels.items()}
        for q, rel in extra.items():
            merged.setdefault(q, {}).update(rel)
        return merged

    def _split(self, split: str) -> dict[str, dict[str, int]]:
        if split not in self.qrels:
            raise ValueError(f"split={split!r} is not loaded; available: {sorted(self.qrels)}")
        return self.qrels[split]

    def query_index(self, ids: Iterable[str]) -> np.ndarray:
        """Row positions of query `ids` in `query_ids`: shape=(len(ids),), dtype=np.int64."""
        if self._query_rows is None:
            self._query_rows = {qid: i for i, qid in enumerate(self.query_ids)}
        return _rows(self._query_rows, ids, "query")

    def doc_index(self, ids: Iterable[str]) -> np.ndarray:
        """Row positions of document `ids` in `corpus_ids`: shape=(len(ids),), dtype=np.int64."""
        if self._doc_rows is None:
            self._doc_rows = {did: i for i, did in enumerate(self.corpus_ids)}
        return _rows(self._doc_rows, ids, "document")

    def fingerprint(self, part: str = "all") -> str:
        """Hex sha256 of the ids and texts, a cache key for embeddings.

        Args:
            part: "corpus" (key for document embeddings), "queries" (query embeddings) or
                "all" (both). Qrels are not hashed: they do not change any embedding.
        """
        if part not in ("all", "corpus", "queries"):
            raise ValueError(f"part must be 'all', 'corpus' or 'queries', got {part!r}")
        if part == "all":
            return hashlib.sha256(
                (self.fingerprint("corpus") + self.fingerprint("queries")).encode()).hexdigest()
        if part not in self._fingerprints:
            ids, texts = ((self.corpus_ids, self.corpus_texts) if part == "corpus"
                          else (self.query_ids, self.query_texts))
            h = hashlib.sha256(part.encode())
            for i, t in zip(ids, texts):
                # \x1f / \x1e separate fields and records, so ("a", "bc") != ("ab", "c").
                # surrogatepass: a lone surrogate (crawled text) hashes instead of raising
                h.update(i.encode("utf-8", "surrogatepass") + b"\x1f" + t.encode("utf-8", "surrogatepass") + b"\x1e")
            self._fingerprints[part] = h.hexdigest()
        return self._fingerprints[part]


def _rows(table: dict[str, int], ids: Iterable[str], what: str) -> np.ndarray:
    if isinstance(ids, str):
        raise TypeError(f"ids must be a sequence of {what} ids, not a single string {ids!r}")
    ids = list(ids)
    missing = [i for i in ids if i not in table]
    if missing:
        raise ValueError(f"{len(missing)} unknown {what} id(s), e.g. {missing[:5]}")
    return np.fromiter((table[i] for i in ids), dtype=np.int64, count=len(ids))


def load_beir(path_or_name: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
              splits: Sequence[str] | None = None, *, base_url: str = BEIR_URL,
              progress: bool = True) -> BeirDataset:
    """Load a BEIR dataset from a folder, or download it by name.

    Args:
        path_or_name: a BEIR folder, or a known BEIR dataset name (see `BEIR_DATASETS`;
            "cqadupstack/<forum>" for a CQADupStack forum) when no such folder exists.
        cache_dir: where downloads go; default `~/.cache/jpq/beir`.
        splits: qrels splits to read (e.g. ["test"]); None reads every `qrels/*.tsv`.
        base_url: archive URL with a `{name}` field (tests point it at a `file://` URL).
        progress: show a tqdm bar while downloading.

    Raises:
        FileNotFoundError: a required file is missing (the message names it).
        ValueError: a malformed line (the message names the file and line number).
        RuntimeError: the download failed.
    """
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"path_or_name must be a str or path, got {type(path_or_name).__name__}")
    if isinstance(splits, str):
        raise TypeError(f"splits must be a sequence of split names, got the string {splits!r}")
    folder = Path(path_or_name).expanduser()
    if not folder.is_dir():
        name = str(path_or_name)
        if name.split("/")[0].lower() not in BEIR_DATASETS:
            raise FileNotFoundError(
                f"{name!r} is neither a folder nor a known BEIR dataset name "
                f"({', '.join(sorted(BEIR_DATASETS))})")
        folder = download_beir(name, cache_dir, base_url=base_url, progress=progress)

    corpus_ids, corpus_texts, corpus_titles = _read_jsonl(_beir_file(folder / "corpus.jsonl"), title=True)
    query_ids, query_texts, _ = _read_jsonl(_beir_file(folder / "queries.jsonl"), title=False)
    if splits is None:
        files = {f.name.removesuffix(".gz").removesuffix(".tsv"): f
                 for f in sorted((folder / "qrels").glob("*.tsv.gz")) + sorted((folder / "qrels").glob("*.tsv"))}
        if not files:
            raise FileNotFoundError(f"no qrels/*.tsv (or *.tsv.gz) file in {folder}")
    else:
        files = {s: _beir_file(folder / "qrels" / f"{s}.tsv") for s in splits}
    known_docs, known_queries = set(corpus_ids), set(query_ids)
    qrels, unmatched = {}, {}
    for split, f in sorted(files.items()):
        qrels[split], missing_docs = _read_qrels(f, known_queries, known_docs)
        if missing_docs:
            unmatched[split] = missing_docs
    return BeirDataset(corpus_ids, corpus_texts, query_ids, query_texts, qrels,
                       name=folder.name, path=str(folder), corpus_titles=corpus_titles, unmatched_qrels=unmatched)


def title_queries(dataset: BeirDataset, max_words: int = 32) -> list[str]:
    """One label-free pseudo-query per document, in corpus order: its title, or for a document
    without one the first sentence of its text (at most `max_words` words). Used by
    `TrainConfig.pseudo_query_weight`: the document is the pseudo-query's one positive."""
    if isinstance(max_words, bool) or not isinstance(max_words, (int, np.integer)) or max_words < 1:
        raise ValueError(f"max_words must be an int >= 1, got {max_words!r}")
    titles = dataset.corpus_titles or [""] * len(dataset.corpus_ids)
    if len(titles) != len(dataset.corpus_texts):
        raise ValueError(f"the dataset has {len(titles)} titles for {len(dataset.corpus_texts)} documents")
    out = []
    for title, text in zip(titles, dataset.corpus_texts):
        if not title:
            first = re.split(r"(?<=[.!?])\s+|\n", text.strip(), maxsplit=1)[0]
            title = " ".join(first.split()[:max_words])
        out.append(title)
    return out


def _valid_unicode(s: str) -> str:
    """s with lone UTF-16 surrogates (JSON escapes such as "\\ud83d" alone, found in crawled text)
    replaced by "?": they cannot be encoded, hashed or tokenized."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def _beir_file(file: Path) -> Path:
    """`file`, or `file`.gz when only the gzipped one exists (some BEIR mirrors ship those)."""
    gz = file.with_name(file.name + ".gz")
    if not file.is_file() and gz.is_file():
        return gz
    if not file.is_file():
        raise FileNotFoundError(f"missing BEIR file: {file}")
    return file


def _text_lines(file: Path):
    """(line number, line) of a UTF-8 text file (gzipped if its name ends in .gz; any newline
    convention; a byte order mark dropped). A line that is not UTF-8 raises ValueError naming the
    file and line: undecodable bytes come through as lone surrogates U+DC80-U+DCFF
    ("surrogateescape"), which no UTF-8 text decodes to."""
    raw = gzip.open(file, "rb") if file.suffix == ".gz" else open(file, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline=None) as f:
        for lineno, line in enumerate(f, 1):
            bad = _UNDECODABLE.search(line)
            if bad:
                raise ValueError(f"{file}:{lineno}: not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} at "
                                 f"character {bad.start() + 1}); BEIR files are UTF-8")
            yield lineno, line


_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _json_string(obj: dict, key: str, required: bool = False) -> str:
    """obj[key] as a string: a string, or a number written out; None or absent is "" unless
    `required`. Anything else (an object, a list, a bool) is a malformed line (TypeError)."""
    value = obj.get(key)
    if value is None and not required:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"{key!r} must be a string, got {json.dumps(value)}")
    value = str(value)
    if required and not value.strip():
        raise TypeError(f"{key!r} must be a non-empty string, got {json.dumps(obj.get(key))}")
    return value


def _read_jsonl(file: Path, title: bool) -> tuple[list[str], list[str], list[str]]:
    """Read `_id`s, texts and titles; with `title`, the text is `title + " " + text` and the
    titles are the stripped `title` fields (all "" without `title`)."""
    ids, texts, heads, seen = [], [], [], set()
    for lineno, line in _text_lines(file):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise TypeError(f"a JSON {type(obj).__name__}, not an object")
            _id = _json_string(obj, "_id", required=True)
            text = _json_string(obj, "text")
            head = _json_string(obj, "title") if title else ""
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{file}:{lineno}: malformed line "
                             f"(want a JSON object with a string '_id'): {e}") from None
        if _id in seen:
            raise ValueError(f"{file}:{lineno}: duplicate _id {_id!r}")
        seen.add(_id)
        _id, text, head = _valid_unicode(_id), _valid_unicode(text), _valid_unicode(head)
        ids.append(_id)
        texts.append(f"{head} {text}".strip() if head.strip() else text.strip())
        heads.append(head.strip())
    return ids, texts, heads


def _read_qrels(file: Path, known_queries: set[str], known_docs: set[str]):
    """Read one qrels TSV as BEIR's loader does: query-id, corpus-id and an integer score in the
    first three tab-separated columns (more are ignored), a header line first if its score is
    not an integer. Return (qrels, unmatched): the pairs of known queries and documents, and those
    of known queries whose document is not in the corpus (kept for evaluation only). Pairs with an
    unknown query id are dropped; a warning counts and shows both kinds. A file none of whose pairs
    names a known query and document raises ValueError (the ids do not belong to this corpus and
    these queries)."""
    if not file.is_file():
        raise FileNotFoundError(f"missing BEIR qrels file: {file}")
    qrels: dict[str, dict[str, int]] = {}
    unmatched: dict[str, dict[str, int]] = {}
    unknown_queries, unknown_docs, pairs, first = [], [], 0, True
    for lineno, line in _text_lines(file):
        if not line.strip():
            continue
        cols = line.rstrip("\r\n").split("\t")
        header, first = first, False
        try:
            if len(cols) < 3:
                hint = (" (separated by spaces? a TREC qrels file has 4 columns: query-id 0 corpus-id score)"
                        if len(line.split()) >= 3 else "")
                raise ValueError(f"{len(cols)} tab-separated column(s){hint}")
            qid, did, score = cols[0], cols[1], int(cols[2])
        except ValueError as e:
            if header and len(cols) >= 3:
                continue  # "query-id<TAB>corpus-id<TAB>score", or another header
            raise ValueError(f"{file}:{lineno}: malformed qrels line "
                             f"(want query-id<TAB>corpus-id<TAB>integer score): {e}") from None
        pairs += 1
        if qid not in known_queries:
            unknown_queries.append(qid)
        elif did not in known_docs:
            unknown_docs.append(did)
            unmatched.setdefault(qid, {})[did] = score
        else:
            qrels.setdefault(qid, {})[did] = score
    dropped = len(unknown_queries) + len(unknown_docs)
    if dropped:
        what = "; ".join(f"{len(ids)} with an unknown {kind} id, e.g. {sorted(set(ids))[:3]}"
                         for kind, ids in (("query", unknown_queries), ("corpus", unknown_docs)) if ids)
        if dropped == pairs:
            raise ValueError(f"{file}: none of its {pairs} pairs names a known query and corpus document ({what}): "
                             "these judgments are not of this corpus and these queries")
        kept = (f"; the {len(unknown_docs)} of known queries with a document missing from the corpus are kept for "
                "evaluation (relevant, never retrieved, as pytrec_eval on this file counts them), not for training"
                if unknown_docs else "")
        logger.warning("%s: %d of %d qrels pairs name an unknown id (%s)%s", file, dropped, pairs, what, kept)
    return qrels, unmatched


def download_beir(name: str, cache_dir: str | os.PathLike | None = None, *,
                  base_url: str = BEIR_URL, progress: bool = True) -> Path:
    """Download and unzip a BEIR dataset once; return its folder.

    The archive goes to `cache_dir/<name>.zip.part`, is unzipped into a temporary folder
    next to the final one and renamed into place, so an interrupted run never leaves a
    half-extracted dataset behind. An existing folder is reused without any network call.

    Raises:
        RuntimeError: the archive could not be downloaded or is not a zip file.
    """
    archive, _, sub = name.partition("/")
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    target = cache / archive
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        url = base_url.format(name=archive)
        part = cache / f"{archive}.zip.part"
        tmp = Path(tempfile.mkdtemp(prefix=f".{archive}-", dir=cache))
        try:
            logger.info("downloading BEIR dataset %r from %s", archive, url)
            _fetch(url, part, progress)
            with zipfile.ZipFile(part) as z:
                z.extractall(tmp)
            # The archives hold one top folder named like the dataset; accept a flat one too.
            entries = list(tmp.iterdir())
            src = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
            try:
                src.rename(target)
            except OSError:
                if not target.is_dir():  # not a concurrent download that finished first
                    raise
        except (urllib.error.URLError, OSError, zipfile.BadZipFile) as e:
            raise RuntimeError(
                f"could not download BEIR dataset {archive!r} from {url} ({e}); "
                "download and unzip it yourself and pass the local folder instead") from e
        finally:
            part.unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
    return target / sub if sub else target


def _fetch(url: str, dest: Path, progress: bool) -> None:
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as out:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name.removesuffix(".part"),
                  disable=not progress) as bar:
            while chunk := r.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


SYNTHETIC_TOPICS = ("protein folding", "vaccine trials", "neural networks", "climate models",
                    "gene expression", "dark matter", "soil bacteria", "heart disease", "quantum dots",
                    "sleep patterns", "ocean currents", "drug resistance")


def make_synthetic_beir(root: str | os.PathLike, n_docs: int = 1200, n_queries: int = 300,
                        test_fraction: float = 0.3, seed: int = 0) -> Path:
    """Write a small BEIR-format folder of generated claim / abstract pairs (for `jpq demo`
    without data, and for tests). Each query paraphrases one document: its topic, cohort number
    and method; ~1/3 of the test queries point to documents no training query points to.
    Returns the folder."""
    if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 1:
        raise ValueError(f"n_docs must be an int >= 1, got {n_docs!r}")
    if isinstance(n_queries, bool) or not isinstance(n_queries, (int, np.integer)) or n_queries < 2:
        raise ValueError(f"n_queries must be an int >= 2 (train and test), got {n_queries!r}")
    n_test = int(round(test_fraction * n_queries)) if 0 < test_fraction < 1 else 0
    if not 1 <= n_test < n_queries:
        raise ValueError(f"test_fraction must leave both splits some of the {n_queries} queries, got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    stale = sorted(p.name for p in (root / "qrels").glob("*.tsv*") if p.name not in ("train.tsv", "test.tsv"))
    if stale:  # they would be loaded as splits of this folder
        raise ValueError(f"{root / 'qrels'} already holds {stale}: write the synthetic folder into an empty one")
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    docs = []
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(n_docs):
            topic = SYNTHETIC_TOPICS[i % len(SYNTHETIC_TOPICS)]
            method = f"method {int(rng.integers(1, 60))}"
            docs.append((topic, i, method))
            f.write(json.dumps({"_id": f"d{i}", "title": f"{topic.capitalize()} in cohort {i}",
                                "text": f"We study {topic} in cohort {i} using {method}; "
                                        f"the effect size was {rng.uniform(0.1, 3):.2f}."}) + "\n")
    train_docs = rng.choice(n_docs, n_queries - n_test, replace=True)
    test_docs = np.concatenate([rng.choice(train_docs, n_test - n_test // 3), rng.choice(n_docs, n_test // 3)])
    rows = {"train": [], "test": []}
    with open(root / "queries.jsonl", "w") as f:
        for j, (split, d) in enumerate([("train", d) for d in train_docs] + [("test", d) for d in test_docs]):
            topic, cohort, method = docs[int(d)]
            f.write(json.dumps({"_id": f"q{j}", "text": f"Does {method} change {topic} outcomes in cohort {cohort}?"}) + "\n")
            rows[split].append(f"q{j}\td{int(d)}\t1")
    for split, lines in rows.items():
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines) + "\n")
    return root
