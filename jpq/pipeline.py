"""The pieces the CLI and the demo share: a dataset with its embeddings, index builders,
training runs and test-split evaluation."""
from __future__ import annotations

import copy
import glob
import math
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import BeirDataset, load_beir, title_queries
from .encoders import DEFAULT_MODEL, SentenceEncoder, cached_embeddings, load_precomputed
from .index import PQIndex, anisotropic_codebooks
from .metrics import evaluate
from .metrics import per_query as per_query_metrics
from .train import JPQTrainer, TrainConfig, fit_and_refit, refit_selected, resolve_device

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("JPQ_CACHE", Path.home() / ".cache" / "jpq"))
EVAL_METRICS = ("ndcg@10", "mrr@10", "recall@100")


@dataclass
class Workspace:
    """A BEIR dataset, its frozen document vectors and zero-shot query vectors."""

    dataset: BeirDataset
    encoder: SentenceEncoder
    doc_emb: np.ndarray  # (n_docs, d) float32, rows in corpus order
    query_emb: np.ndarray  # (n_queries, d) float32, rows in queries order
    train_split: str | None  # None: loaded with need_train=False, no train split
    test_split: str
    cache_dir: Path = DEFAULT_CACHE
    _pseudo_query_emb: np.ndarray | None = field(default=None, init=False, repr=False)

    def pseudo_query_emb(self, progress: bool = True) -> np.ndarray:
        """(n_docs, d) float32: each document's pseudo-query (`jpq.data.title_queries`) through
        the frozen encoder, computed once and cached on disk beside the other embeddings."""
        if self._pseudo_query_emb is None:
            self._pseudo_query_emb = cached_embeddings(
                self.encoder, title_queries(self.dataset), self.dataset.corpus_ids, self.cache_dir / "embeddings",
                f"{self.dataset.name}-pseudo-queries", progress=progress)
        return self._pseudo_query_emb

    @property
    def d(self) -> int:
        return self.doc_emb.shape[1]

    def query_rows(self, ids):
        return self.dataset.query_index(ids)

    def train_ids(self):
        return self.dataset.split_query_ids(self.train_split)

    def test_ids(self):
        """The test split's queries as its qrels file judges them (`BeirDataset.evaluation_qrels`)."""
        return self.dataset.split_query_ids(self.test_split, evaluation=True)

    def train_qrels_by_row(self) -> dict:
        doc_row = {d: i for i, d in enumerate(self.dataset.corpus_ids)}
        return {q: {doc_row[d]: r for d, r in rel.items()}
                for q, rel in self.dataset.qrels[self.train_split].items()}

    def query_texts(self) -> dict:
        return dict(zip(self.dataset.query_ids, self.dataset.query_texts))


def _spot_check(encoder, texts, emb, rows) -> float:
    """Smallest cosine between stored vectors and freshly encoded ones for a few rows."""
    fresh = encoder.encode([texts[i] for i in rows])
    a = fresh / np.linalg.norm(fresh, axis=1, keepdims=True)
    b = emb[rows] / np.linalg.norm(emb[rows], axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def find_precomputed(data_dir: Path, explicit: str | None) -> list[Path]:
    """Candidate precomputed embedding files: the one given, else `<data>-*/embeddings.npz`
    siblings (the layout of ../shared/data/scifact-minilm). Each is validated before use."""
    if explicit:
        return [Path(explicit)]
    return [Path(p) for p in sorted(glob.glob(f"{os.fspath(data_dir).rstrip('/')}-*/embeddings.npz"))]


def load_workspace(data: str, model: str = DEFAULT_MODEL, embeddings: str | None = None,
                   cache_dir: Path = DEFAULT_CACHE, progress: bool = True, device: str = "cpu",
                   need_train: bool = True) -> Workspace:
    """Load a BEIR folder (or a named BEIR dataset, downloaded) and embed it with `model`.

    Document and query vectors come from a validated precomputed file when one is found
    (ids must match and freshly encoded spot checks must agree, cosine > 0.999), else they are
    computed once and cached under `cache_dir` (resumable). `device` ("cpu", "cuda", "cuda:N",
    "auto"): where the encoder runs (the vectors come back as NumPy either way). A train split is
    required with `need_train` (training, the demo); without it (indexing, evaluation) a folder
    with only a test (or dev) split loads too, with `train_split` None."""
    dataset = load_beir(data, cache_dir=cache_dir / "beir")
    splits = set(dataset.qrels)
    train_split = "train" if "train" in splits else None
    test_split = next((s for s in ("test", "dev", "validation") if s in splits), None)
    if (need_train and train_split is None) or test_split is None:
        raise ValueError(f"{data} needs {'a train split and ' if need_train else ''}a test (or dev) split in "
                         f"qrels/, found {sorted(splits)}")
    encoder = SentenceEncoder(model, device=str(resolve_device(device)))
    doc_emb = query_emb = None
    for path in find_precomputed(Path(data), embeddings):
        try:
            doc_emb, query_emb = load_precomputed(path, dataset.corpus_ids, dataset.query_ids, encoder.dim)
        except (ValueError, OSError, KeyError) as e:
            if embeddings:
                raise
            log.info("skipping %s: %s", path, e)
            continue
        rng = np.random.default_rng(0)
        cos_d = _spot_check(encoder, dataset.corpus_texts, doc_emb, rng.choice(len(doc_emb), 4, replace=False))
        cos_q = _spot_check(encoder, dataset.query_texts, query_emb, rng.choice(len(query_emb), 4, replace=False))
        if min(cos_d, cos_q) < 0.999:
            msg = f"{path} does not match encoder {model} (spot-check cosine {min(cos_d, cos_q):.4f})"
            if embeddings:
                raise ValueError(msg)
            log.info("skipping %s", msg)
            doc_emb = query_emb = None
            continue
        log.info("using precomputed embeddings %s (spot-check cosine >= %.5f)", path, min(cos_d, cos_q))
        break
    if doc_emb is None:
        cache = cache_dir / "embeddings"
        doc_emb = cached_embeddings(encoder, dataset.corpus_texts, dataset.corpus_ids, cache,
                                    f"{dataset.name}-corpus", progress=progress)
        query_emb = cached_embeddings(encoder, dataset.query_texts, dataset.query_ids, cache,
                                      f"{dataset.name}-queries", progress=progress)
    return Workspace(dataset, encoder, doc_emb, query_emb, train_split, test_split, cache_dir=Path(cache_dir))


def m_for_ratio(d: int, ratio: float, nbits: int = 8) -> int:
    """Sub-quantizers for a compression ratio of float32 vectors: bytes = 4 d / ratio = M nbits / 8.
    Picks the divisor of d closest to the exact value."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"ratio must be a finite number > 0, got {ratio!r}")
    exact = 4 * d / ratio * 8 / nbits
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    return min(divisors, key=lambda m: (abs(m - exact), -m))


def build_index(doc_emb: np.ndarray, M: int, opq: bool, nbits: int = 8, seed: int = 0,
                anisotropic_eta: float = 1.0, unit_norm: bool = False) -> PQIndex:
    """A post-hoc inner-product (O)PQ index of doc_emb; with anisotropic_eta > 1 its codebooks and
    codes are then refit to the anisotropic loss (`jpq.index.anisotropic_codebooks`); `unit_norm`:
    see `PQIndex`."""
    index = PQIndex(doc_emb.shape[1], M, nbits=nbits, metric="ip", opq=opq, unit_norm=unit_norm)
    index.train(doc_emb, seed=seed)
    index.add(doc_emb)
    if anisotropic_eta != 1.0:
        index = anisotropic_codebooks(index, doc_emb, eta=anisotropic_eta, seed=seed)
    return index


def evaluate_vectors(ws: Workspace, q: np.ndarray, index: PQIndex | None, ids: list[str], k: int = 100,
                     per_query: bool = False):
    """Test metrics for query vectors q (rows aligned with ids), exact search when index is None:
    their means, or with `per_query` {metric: {query id: value}}."""
    if index is None:
        scores = torch.from_numpy(q) @ torch.from_numpy(ws.doc_emb).T
        I = torch.topk(scores, min(k, scores.shape[1]), dim=1).indices.numpy()
    else:
        if index.ids is not None or index.ntotal != len(ws.dataset.corpus_ids):
            raise ValueError(f"the index holds {index.ntotal} vectors{' under ids of their own' if index.ids is not None else ''}"
                             f"; scoring it against {ws.dataset.name} needs one vector per corpus document, at its "
                             f"corpus row ({len(ws.dataset.corpus_ids)}, added without ids, as `jpq index` builds it)")
        I = index.search(q, k)[1]
    qrels = ws.dataset.evaluation_qrels(ws.test_split)
    return (per_query_metrics if per_query else evaluate)((I, ids, ws.dataset.corpus_ids), qrels, EVAL_METRICS)


def _trainer_factory(ws: Workspace, index: PQIndex | None, progress: bool, trainer_class=JPQTrainer):
    """make(config, out_dir) -> a `trainer_class` (JPQTrainer or a subclass) on ws with fresh copies
    of the encoder and the index, so runs never leak into each other."""
    rows = dict(zip(ws.dataset.query_ids, ws.query_emb))

    def make(cfg: TrainConfig, out: Path | None) -> JPQTrainer:
        pseudo = (ws.pseudo_query_emb(progress=progress)
                  if cfg.pseudo_query_weight > 0 and cfg.mode in ("jpq", "centroids") else None)
        encoder = copy.deepcopy(ws.encoder) if cfg.mode in ("jpq", "encoder") else None
        return trainer_class(cfg, ws.doc_emb, copy.deepcopy(index), ws.train_ids(), ws.train_qrels_by_row(),
                          query_texts=ws.query_texts(), query_embeddings=rows, encoder=encoder,
                          out_dir=out, progress=progress, pseudo_queries=pseudo)

    return make


def train_run(ws: Workspace, config: TrainConfig, index: PQIndex | None, out_dir: Path | None,
              resume: bool = True, progress: bool = True, select_only: bool = False, trainer_class=JPQTrainer):
    """One training run; returns (trainer, seconds, selection).

    The run selects its epoch count on held-out training queries (`selection`: the TrainState of
    that run, with `best_epoch` and `best_score`). With `config.refit` (the default) a second
    trainer then starts again from the same initial state and trains on all training queries for
    `best_epoch` epochs, in `out_dir/refit`; that one is returned. When epoch 0 (the initial
    state) wins the selection, nothing is retrained. With `select_only` the selection trainer is
    returned as it is (`refit_run` refits it later, e.g. once it has won against other runs).
    Every trainer gets fresh copies of the encoder and the index, so runs never leak into each other.
    `trainer_class`: JPQTrainer or a subclass of it (an experiment's extra loss term)."""
    t0 = time.perf_counter()
    make = _trainer_factory(ws, index, progress, trainer_class)
    if select_only:
        trainer = make(config, out_dir)
        trainer.fit(resume=resume)
        return trainer, time.perf_counter() - t0, trainer.state
    trainer, selected = fit_and_refit(make, config, out_dir, resume=resume)
    return trainer, time.perf_counter() - t0, selected.state


def refit_run(ws: Workspace, config: TrainConfig, index: PQIndex | None, out_dir: Path | None,
              selected: JPQTrainer, resume: bool = True, progress: bool = True):
    """The refit step of `train_run` for a selection trainer from `train_run(..., select_only=True)`
    with the same config, index and out_dir; returns (trainer, seconds)."""
    t0 = time.perf_counter()
    trainer = refit_selected(_trainer_factory(ws, index, progress), config, selected, out_dir, resume=resume)
    return trainer, time.perf_counter() - t0


def selection_summary(selection, trainer) -> dict:
    """What the held-out selection chose (epochs, its validation score; None without held-out
    queries) and whether the returned trainer was refit on all training queries."""
    val = float(selection.best_score)
    return {"best_epoch": selection.best_epoch, "val": round(val, 6) if math.isfinite(val) else None,
            "refit": trainer.state is not selection}
