"""`jpq.tree`: a hierarchical index whose routing is learned with the query tower (EHI-style,
Kumar et al., NeurIPS 2023), with PQ-coded leaves searched by jpq's ADC kernel.

    index = TreeIndex(d=384, branching=(8, 8), M=96)        # 64 leaves, 96-byte PQ codes
    index.train(xb); index.add(xb)                           # hierarchical k-means = an IVF tree
    D, I = index.search(xq, k=100, beam=6)                   # scores only the reached leaves
    index.fraction_scored(xq, beam=6)                        # mean share of documents scored
    trainer = TreeTrainer(TreeConfig(), index, xb, train_ids, qrels, query_embeddings=...)
    trainer.fit(); index = trainer.trained_index()

Structure. A tree of fixed height L = len(branching). Level l holds n_l = b_0 * ... * b_l nodes
(leaf order = row-major path order, so the parent of node j at level l is j // b_l), each with a
learned embedding e (d,) and bias c. A vector x is routed at each level by a softmax over the
children of a node:

    z_l[j]   = s_l * (x . e_j + c_j)                  (s_l = exp(log_scale[l]), learned)
    p(j | parent(j), x) = softmax of z_l over the siblings of j
    log p(leaf | x)     = sum over levels of log p(ancestor_l(leaf) | ancestor_{l-1}, x)

With c_j = -||e_j||^2 / 2 (the initialisation) the argmax child is the nearest centroid in L2, so
the k-means tree routes exactly like an IVF tree. A document's leaf is its most probable path
(argmax of the joint over all leaves); a query is routed by beam search: at every level the
`beam` best nodes by path log-probability are kept and expanded, and the documents of the
`beam` leaves reached are scored. Empty subtrees are masked out of the beam. The beam width sets
the fraction of documents scored (`fraction_scored`).

Leaves store their documents as PQ codes (a `PQIndex` inside, raw vectors, not residuals): search
gathers the codes of the reached leaves, sorts them by global id and runs `adc_topk` on them,
so a beam covering every leaf returns exactly what `PQIndex.search` returns on the same codes.

Training (`TreeTrainer`). The query tower is any torch module; the default is a residual linear
adapter on the frozen encoder's query vectors (`ResidualLinear`: q' = q + W q, W = 0 at start),
because fine-tuning MiniLM costs ~1.5 s per 32-query step on the 2-core dev CPU. A full text
encoder can be plugged in instead (queries given as texts). An optional trainable document
projection (`doc_tower`) re-encodes the documents (leaves and PQ codes) when documents are
re-assigned. Per step, for a batch of training queries:
  - retrieval loss: softmax cross-entropy of the positives against the hard negatives the
    current tree's beam reaches (scored with the PQ reconstructions: what search will score);
  - routing loss: -log sum over positives of p(leaf(d+) | q) (pulls the query's path to the
    positive document's path; gradients reach node embeddings, biases, scales and the tower);
  - document loss: -log p(leaf(d) | d) over a sample of documents plus the positives (keeps the
    tree a clustering of the documents, so that moving nodes for queries does not scatter them);
  - balance: KL(mean leaf distribution of the sampled documents || uniform) (no collapse).
Documents are re-assigned to their most probable leaves every `reassign_every` epochs.
Validation on held-out training queries (held-out part of train, never test) at the target
fractions; epoch 0 is the k-means tree, so the selected model is never worse on validation.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .index import PQIndex, train_pq_centroids
from .kernels import adc_topk, assign
from .kernels.arrays import array_kind, check_float_matrix, check_k, check_metric, to_numpy_f32
from .metrics import evaluate
from .train import TrainState, ce_loss, holdout_split

log = logging.getLogger(__name__)

FORMAT_MAGIC = b"JPQTREE\0"
FORMAT_VERSION = 1
TARGET_FRACTIONS = (0.05, 0.10, 0.20)


# --------------------------------------------------------------------------- size rules
def default_branching(n: int, levels: int = 2) -> tuple[int, ...]:
    """The same rule for every dataset: about sqrt(n) leaves over `levels` levels, each level with
    round(n ** (1 / (2 * levels))) children (at least 2, at most 64). SciFact (5,183 docs): (8, 8)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    b = int(min(64, max(2, round(n ** (1.0 / (2 * levels))))))
    return (b,) * levels


def default_pq_m(d: int) -> int:
    """PQ sub-quantizers: 4 dimensions per sub-vector (384-d -> M=96, 96 bytes a document), else
    the nearest sub-vector length that divides d. At 4 dims per sub-vector PQ costs SciFact
    0.003 nDCG@10 (0.6426 vs 0.6451 exact; 8 dims: 0.626), so routing, not PQ, sets the quality."""
    for ds in (4, 2, 8, 3, 6, 1):
        if d % ds == 0:
            return d // ds
    return d


# --------------------------------------------------------------------------- k-means
def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0) -> np.ndarray:
    """L2 k-means of x (n, d) -> (k, d) float32 centroids (Lloyd on the assign kernel, via
    `train_pq_centroids` with one subspace). With n < k the n points are used and the missing
    centroids repeat the last point (their leaves stay empty: ties go to the smallest index)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n == 0:
        raise ValueError("k-means of an empty set")
    if n <= k:
        return np.concatenate([x, np.repeat(x[-1:], k - n, 0)]).astype(np.float32)
    return train_pq_centroids(x, 1, k, niter=niter, seed=seed)[0]


def hierarchical_kmeans(x: np.ndarray, branching: Sequence[int], niter: int = 20,
                        seed: int = 0) -> list[np.ndarray]:
    """Top-down k-means: level l clusters each level-(l-1) cluster's members into b_l children.

    x: shape=(n, d) float32 -> one array per level, shape=(n_l, d) float32, n_l = prod(b_0..b_l),
    in row-major path order (children of node j at level l-1 are j*b_l ... j*b_l + b_l - 1).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = []
    members = [np.arange(len(x))]
    for level, b in enumerate(branching):
        cents, nxt = [], []
        for j, rows in enumerate(members):
            if len(rows) == 0:  # empty subtree: copy the parent so its children stay empty
                parent = out[-1][j] if out else x.mean(0)
                cents.append(np.repeat(parent[None], b, 0))
                nxt.extend([rows[:0]] * b)
                continue
            C = kmeans(x[rows], b, niter=niter, seed=seed + 7919 * level + j)
            cents.append(C)
            lab = assign(x[rows], C[None])[:, 0]  # nearest centroid, ties to the smaller index
            nxt.extend(rows[lab == c] for c in range(b))
        out.append(np.concatenate(cents).astype(np.float32))
        members = nxt
    return out


# --------------------------------------------------------------------------- routing (torch)
def leaf_log_probs(x: torch.Tensor, embeddings: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                   log_scales: torch.Tensor, branching: Sequence[int]) -> torch.Tensor:
    """Log-probability of every leaf's path, differentiable in every argument.

    x: shape=(n, d); embeddings[l]: shape=(n_l, d); biases[l]: shape=(n_l,); log_scales: shape=(L,)
    -> shape=(n, n_leaves), same dtype as x.

    Loop form: for each leaf with path (j_0, ..., j_{L-1}):
        out[i, leaf] = sum_l log softmax_{siblings of j_l}(s_l * (x_i . e_j + c_j))[j_l]
    """
    n = x.shape[0]
    total = x.new_zeros((n, 1))
    for level, b in enumerate(branching):
        z = (x @ embeddings[level].T + biases[level]) * log_scales[level].exp()
        logp = F.log_softmax(z.reshape(n, -1, b), dim=-1)  # softmax over each node's children
        total = (total.unsqueeze(-1) + logp).reshape(n, -1)
    return total


def level_log_probs(x, embeddings, biases, log_scales, branching):
    """Per-level conditional log-probabilities log p(node | parent, x): list of (n, n_l)."""
    n = x.shape[0]
    out = []
    for level, b in enumerate(branching):
        z = (x @ embeddings[level].T + biases[level]) * log_scales[level].exp()
        out.append(F.log_softmax(z.reshape(n, -1, b), dim=-1).reshape(n, -1))
    return out


@torch.no_grad()
def beam_search(x: torch.Tensor, embeddings, biases, log_scales, branching, beam: int,
                node_counts: Sequence[np.ndarray] | None = None):
    """Route x (n, d) down the tree keeping the `beam` best nodes (by path log-probability) per
    level. node_counts[l] (n_l,): documents under each node; nodes with none are skipped.

    Returns leaves shape=(n, w) int64 (w = min(beam, n_leaves)), best first, and their path
    log-probabilities shape=(n, w) (-inf where fewer than w non-empty leaves exist).
    The per-level logits are one GEMM over all nodes of the level (for trees of a few thousand
    nodes that is cheaper than gathering each query's children), then pruned to the beam.
    """
    n = x.shape[0]
    logps = level_log_probs(x, embeddings, biases, log_scales, branching)
    score = x.new_zeros((n, 1))
    nodes = torch.zeros((n, 1), dtype=torch.int64)
    for level, b in enumerate(branching):
        children = (nodes.unsqueeze(-1) * b + torch.arange(b)).reshape(n, -1)  # (n, w * b)
        cand = score.repeat_interleave(b, dim=1) + torch.gather(logps[level], 1, children)
        if node_counts is not None:
            empty = torch.from_numpy(node_counts[level] == 0)[children]
            cand = cand.masked_fill(empty, -math.inf)
        w = min(beam, cand.shape[1])
        # stable sort: ties go to the smaller node index, so results do not depend on torch's topk
        order = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, :w]
        score = torch.gather(cand, 1, order)
        nodes = torch.gather(children, 1, order)
    return nodes, score


class ResidualLinear(nn.Module):
    """The default query tower: q' = q + W q with W (d, d) zero-initialised, so step 0 is the
    frozen encoder's query vectors. Maps vectors to vectors; the index stores I + W so that
    `TreeIndex.search` takes the frozen encoder's vectors."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x @ self.weight.T

    def matrix(self) -> np.ndarray:
        """(d, d) float32 A with forward(x) = x @ A.T."""
        return (torch.eye(self.weight.shape[0]) + self.weight.detach()).float().numpy()


# --------------------------------------------------------------------------- index
class TreeIndex:
    """A tree of learned routing nodes over PQ-coded leaves.

    Args:
        d: vector dimension.
        branching: children per node at each level, e.g. (8, 8) = 64 leaves (`default_branching`).
        M, nbits, opq: the leaves' PQ (see `PQIndex`); M defaults to `default_pq_m(d)`.
        metric: "ip" or "l2": how the leaves' documents are scored. Routing is the learned
            softmax above in both cases (k-means initialised, L2 nearest-centroid at step 0).
        init_scale: routing inverse temperature s_l at initialisation. 50 makes the most probable
            path agree with greedy nearest-centroid descent for 99.9% of SciFact documents.

    Attributes (NumPy, float32 unless stated):
        embeddings[l]: shape=(n_l, d); biases[l]: shape=(n_l,); log_scales: shape=(L,).
        query_matrix: shape=(d, d) or None; search maps q -> q @ query_matrix.T first (the
            trained `ResidualLinear` tower).
        leaf_of: shape=(ntotal,) int64, each document's leaf.
        pq: the PQIndex holding the codes (pq.codes shape=(ntotal, M) uint8, global id order).
    """

    def __init__(self, d: int, branching: Sequence[int] = (8, 8), M: int | None = None, nbits: int = 8,
                 metric: str = "ip", opq: bool = False, init_scale: float = 50.0):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise TypeError(f"d must be an int, got {type(d).__name__}")
        if isinstance(branching, (int, np.integer)) or not isinstance(branching, (tuple, list)):
            raise TypeError(f"branching must be a tuple of ints (children per level), got {branching!r}")
        if not branching or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 2
                                for b in branching):
            raise ValueError(f"branching needs at least one level, each with >= 2 children, got {branching!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        M = default_pq_m(int(d)) if M is None else M
        self.pq = PQIndex(d, M, nbits=nbits, metric=metric, opq=opq)  # validates d, M, nbits, metric
        self.d = int(d)
        self.branching = tuple(int(b) for b in branching)
        self.metric = check_metric(metric)
        self.init_scale = float(init_scale)
        self.embeddings: list[np.ndarray] | None = None
        self.biases: list[np.ndarray] | None = None
        self.log_scales: np.ndarray | None = None
        self.query_matrix: np.ndarray | None = None
        self.leaf_of = np.empty(0, np.int64)
        self._lists = None

    # ------------------------------------------------------------------ properties
    @property
    def M(self) -> int:
        return self.pq.M

    @property
    def nbits(self) -> int:
        return self.pq.nbits

    @property
    def levels(self) -> int:
        return len(self.branching)

    @property
    def n_leaves(self) -> int:
        return int(np.prod(self.branching))

    @property
    def ntotal(self) -> int:
        return int(self.leaf_of.shape[0])

    @property
    def is_trained(self) -> bool:
        return self.embeddings is not None and self.pq.is_trained

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return (f"TreeIndex(d={self.d}, branching={self.branching}, M={self.M}, nbits={self.nbits}, "
                f"metric={self.metric!r}, ntotal={self.ntotal})")

    # ------------------------------------------------------------------ helpers
    def _vectors(self, name: str, x) -> np.ndarray:
        array_kind(**{name: x})
        check_float_matrix(name, x)
        if x.shape[1] != self.d:
            raise ValueError(f"{name} must have shape (n, {self.d}), got {tuple(x.shape)}")
        return to_numpy_f32(x)

    def _require_trained(self):
        if not self.is_trained:
            raise RuntimeError("the index is not trained: call train(x) or load a trained index first")

    def routing_params(self, dtype=torch.float32):
        """(embeddings, biases, log_scales) as torch tensors (copies)."""
        self._require_trained()
        return ([torch.tensor(e, dtype=dtype) for e in self.embeddings],
                [torch.tensor(c, dtype=dtype) for c in self.biases],
                torch.tensor(self.log_scales, dtype=dtype))

    def set_routing(self, embeddings, biases, log_scales):
        """Install routing parameters (NumPy or torch); re-assign nothing (call `reassign`)."""
        as_np = (lambda t: t.detach().cpu().float().numpy().copy() if isinstance(t, torch.Tensor)
                 else np.array(t, dtype=np.float32))
        emb = [as_np(e) for e in embeddings]
        bia = [as_np(c) for c in biases]
        n_l = np.cumprod(self.branching)
        if len(emb) != self.levels or any(e.shape != (n, self.d) for e, n in zip(emb, n_l)):
            raise ValueError(f"embeddings must be {self.levels} arrays of shapes "
                             f"{[(int(n), self.d) for n in n_l]}, got {[e.shape for e in emb]}")
        if len(bia) != self.levels or any(c.shape != (n,) for c, n in zip(bia, n_l)):
            raise ValueError(f"biases must have shapes {[(int(n),) for n in n_l]}, got {[c.shape for c in bia]}")
        self.embeddings, self.biases = emb, bia
        self.log_scales = as_np(log_scales).reshape(self.levels)

    def transform_queries(self, q: np.ndarray) -> np.ndarray:
        """q (n, d) -> the query tower's output for the stored linear tower (identity if none)."""
        return q if self.query_matrix is None else np.ascontiguousarray(q @ self.query_matrix.T)

    # ------------------------------------------------------------------ build
    def train(self, x, niter: int = 20, seed: int = 0, pq_niter: int = 25, max_train_points: int | None = 65536):
        """Hierarchical k-means for the routing nodes (biases -||e||^2/2: nearest-centroid
        routing) and the leaves' PQ codebooks, from x (n, d) with n >= 2**nbits."""
        x = self._vectors("x", x)
        if x.shape[0] < self.pq.K:
            raise ValueError(f"training needs at least 2**nbits={self.pq.K} vectors, got {x.shape[0]}")
        if max_train_points is not None and x.shape[0] > max_train_points:
            x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], max_train_points, replace=False))]
        cents = hierarchical_kmeans(x, self.branching, niter=niter, seed=seed)
        self.set_routing(cents, [-0.5 * (c.astype(np.float64) ** 2).sum(1) for c in cents],
                         np.full(self.levels, math.log(self.init_scale), np.float32))
        self.pq.train(x, niter=pq_niter, seed=seed + 1, max_train_points=None)
        return self

    def assign_leaves(self, x, batch: int = 4096) -> np.ndarray:
        """Most probable leaf (argmax of the joint path probability) of each row of x (n, d)."""
        self._require_trained()
        x = self._vectors("x", x)
        emb, bia, ls = self.routing_params()
        out = np.empty(len(x), np.int64)
        with torch.no_grad():
            for s in range(0, len(x), batch):
                lp = leaf_log_probs(torch.from_numpy(x[s : s + batch]), emb, bia, ls, self.branching)
                out[s : s + batch] = lp.argmax(1).numpy()
        return out

    def add(self, x):
        """Route x (n, d) to their most probable leaves and append their PQ codes; ids continue
        from ntotal."""
        self._require_trained()
        x = self._vectors("x", x)
        leaves = self.assign_leaves(x)
        self.pq.add(x)
        self.leaf_of = np.concatenate([self.leaf_of, leaves])
        self._lists = None

    def reassign(self, x):
        """Re-route the stored documents, given their vectors x (ntotal, d), with the current
        routing (codes unchanged)."""
        x = self._vectors("x", x)
        if len(x) != self.ntotal:
            raise ValueError(f"x has {len(x)} rows but the index holds {self.ntotal} documents")
        self.leaf_of = self.assign_leaves(x)
        self._lists = None

    def reset(self):
        self.pq.reset()
        self.leaf_of = np.empty(0, np.int64)
        self._lists = None

    def leaf_sizes(self) -> np.ndarray:
        """Documents per leaf, shape=(n_leaves,) int64."""
        return np.bincount(self.leaf_of, minlength=self.n_leaves)

    def _inverted_lists(self):
        """(offsets (n_leaves + 1,), ids (ntotal,) sorted by leaf then id, node counts per level)."""
        if self._lists is None:
            sizes = self.leaf_sizes()
            ids = np.argsort(self.leaf_of, kind="stable")
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            counts = [sizes]
            for b in reversed(self.branching[1:]):
                counts.insert(0, counts[0].reshape(-1, b).sum(1))
            self._lists = (offsets, ids, counts)
        return self._lists

    # ------------------------------------------------------------------ search
    def probe(self, q, beam: int, transformed: bool = False):
        """Leaves reached by beam search: (leaves (nq, w) int64 best first, path log-probs (nq, w)).
        q (nq, d) goes through `query_matrix` first unless `transformed`."""
        self._require_trained()
        beam = _check_beam(beam)
        q = self._vectors("q", q)
        if not transformed:
            q = self.transform_queries(q)
        emb, bia, ls = self.routing_params()
        _, _, counts = self._inverted_lists()
        leaves, score = beam_search(torch.from_numpy(q), emb, bia, ls, self.branching, beam, counts)
        return leaves.numpy(), score.numpy()

    def fraction_scored(self, q, beam: int) -> float:
        """Mean over the queries q (nq, d) of (documents in the reached leaves) / ntotal."""
        leaves, score = self.probe(q, beam)
        if self.ntotal == 0 or len(leaves) == 0:
            return 0.0
        sizes = np.where(np.isfinite(score), self.leaf_sizes()[leaves], 0)
        return float(sizes.sum(1).mean() / self.ntotal)

    def search(self, q, k: int, beam: int, backend: str = "auto"):
        """k best documents among those in the `beam` leaves each query reaches, by ADC.

        q: shape=(nq, d) float32, NumPy or torch (the frozen encoder's query vectors; the stored
        query tower is applied here). Returns D (nq, k) float32 and I (nq, k) int64 (global ids),
        best first, ties by smaller id, -1 ids (and -FLT_MAX / +FLT_MAX scores) when fewer than k
        documents were scored; torch in, torch out. A beam covering every leaf scores every
        document and returns exactly `PQIndex.search` on the same codes.
        """
        kind = array_kind(q=q)
        k = check_k(k)
        qt = self.transform_queries(self._vectors("q", q))
        leaves, score = self.probe(qt, beam, transformed=True)
        offsets, ids, _ = self._inverted_lists()
        lut = self.pq.lut(qt, backend="reference" if backend == "reference" else "cpu")
        fill = -np.finfo(np.float32).max if self.metric == "ip" else np.finfo(np.float32).max
        D = np.full((len(qt), k), fill, np.float32)
        I = np.full((len(qt), k), -1, np.int64)
        for i in range(len(qt)):
            reached = leaves[i][np.isfinite(score[i])]
            rows = np.sort(np.concatenate([ids[offsets[l] : offsets[l + 1]] for l in reached])) \
                if len(reached) else np.empty(0, np.int64)
            if len(rows) == 0:
                continue
            # rows sorted by global id: the kernel's tie rule (smaller position) = smaller id
            d_i, i_i = adc_topk(lut[i : i + 1], self.pq.codes[rows], k, metric=self.metric,
                                backend=backend, check=False)
            d_i, i_i = np.asarray(d_i)[0], np.asarray(i_i)[0]
            found = i_i >= 0
            D[i, found] = d_i[found]
            I[i, found] = rows[i_i[found]]
        return kind.wrap(D), kind.wrap(I)

    def beam_for_fraction(self, q, target: float, max_beam: int | None = None) -> tuple[int, float]:
        """The beam whose measured fraction scored on q is closest to `target` (ties: the smaller
        beam). Returns (beam, fraction)."""
        best = None
        for beam in range(1, (max_beam or self.n_leaves) + 1):
            f = self.fraction_scored(q, beam)
            if best is None or abs(f - target) < abs(best[1] - target) - 1e-12:
                best = (beam, f)
            if f >= target:
                break
        return best

    # ------------------------------------------------------------------ persistence
    def _arrays(self) -> dict:
        arrays = {"leaf_of": self.leaf_of, "codes": self.pq.codes}
        if self.embeddings is not None:
            for l in range(self.levels):
                arrays[f"embeddings.{l}"] = self.embeddings[l]
                arrays[f"biases.{l}"] = self.biases[l]
            arrays["log_scales"] = self.log_scales
        if self.pq.centroids is not None:
            arrays["centroids"] = self.pq.centroids
        if self.pq.rotation is not None:
            arrays["rotation"] = self.pq.rotation
        if self.query_matrix is not None:
            arrays["query_matrix"] = self.query_matrix
        return arrays

    def save(self, path):
        """Versioned, checksummed, atomic file, laid out as `PQIndex.save` (magic, header length,
        JSON header with the array table and the payload's sha256, raw arrays)."""
        params = {"d": self.d, "branching": list(self.branching), "M": self.M, "nbits": self.nbits,
                  "metric": self.metric, "opq": self.pq.opq, "init_scale": self.init_scale}
        _write_container(path, "jpq.TreeIndex", params, self._arrays())

    @classmethod
    def load(cls, path) -> "TreeIndex":
        """Read a file written by `save`; a foreign, truncated or corrupted file raises ValueError."""
        header, arrays = _read_container(path, "jpq.TreeIndex")
        index = cls(header["d"], tuple(header["branching"]), header["M"], header["nbits"], header["metric"],
                    header["opq"], header["init_scale"])
        index.pq.codes = arrays["codes"]
        index.pq.centroids = arrays.get("centroids")
        index.pq.rotation = arrays.get("rotation")
        index.query_matrix = arrays.get("query_matrix")
        index.leaf_of = arrays["leaf_of"]
        if "log_scales" in arrays:
            index.set_routing([arrays[f"embeddings.{l}"] for l in range(index.levels)],
                              [arrays[f"biases.{l}"] for l in range(index.levels)], arrays["log_scales"])
        return index


def _check_beam(beam) -> int:
    if isinstance(beam, bool) or not isinstance(beam, (int, np.integer)):
        raise TypeError(f"beam must be an int, got {type(beam).__name__}")
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    return int(beam)


# --------------------------------------------------------------------------- file container
def _write_container(path, fmt: str, params: dict, arrays: dict):
    """PQIndex.save's layout for any array set: FORMAT_MAGIC, uint32 header length, JSON header
    (format, version, params, array table, payload sha256), raw little-endian arrays; written to a
    temp file in the same folder, fsync'ed, then renamed over `path`."""
    payload = io.BytesIO()
    table = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        table[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": payload.tell(), "nbytes": a.nbytes}
        payload.write(a.tobytes())
    body = payload.getvalue()
    header = json.dumps({"format": fmt, "version": FORMAT_VERSION, **params, "arrays": table,
                         "payload_nbytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jpq", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(FORMAT_MAGIC)
            f.write(len(header).to_bytes(4, "little"))
            f.write(header)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_container(path, fmt: str):
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    if blob[: len(FORMAT_MAGIC)] != FORMAT_MAGIC:
        raise ValueError(f"{path} is not a jpq tree index file (bad magic bytes)")
    pos = len(FORMAT_MAGIC)
    if len(blob) < pos + 4:
        raise ValueError(f"{path} is truncated: the header is missing")
    hlen = int.from_bytes(blob[pos : pos + 4], "little")
    pos += 4
    if len(blob) < pos + hlen:
        raise ValueError(f"{path} is truncated: the header is incomplete")
    try:
        header = json.loads(blob[pos : pos + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} has a corrupted header: {e}") from None
    if header.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt} file (format {header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {header.get('version')}; this jpq reads version {FORMAT_VERSION}")
    body = blob[pos + hlen :]
    if len(body) != header["payload_nbytes"]:
        raise ValueError(f"{path} is truncated: payload has {len(body)} of {header['payload_nbytes']} bytes")
    if hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise ValueError(f"{path} is corrupted: sha256 checksum mismatch")
    arrays = {}
    for name, spec in header["arrays"].items():
        arrays[name] = np.frombuffer(body, dtype=np.dtype(spec["dtype"]), count=int(np.prod(spec["shape"])),
                                     offset=spec["offset"]).reshape(spec["shape"]).copy()
    return header, arrays


# --------------------------------------------------------------------------- training
@dataclass
class TreeConfig:
    """Hyper-parameters; the defaults are the ones the demo uses on every dataset."""

    epochs: int = 20
    batch_size: int = 32
    lr_nodes: float = 1e-3  # node embeddings, biases and routing scales
    lr_query: float = 1e-3  # query tower (the residual adapter starts at W = 0)
    lr_doc: float = 1e-4  # document tower, when one is given
    weight_decay: float = 0.01  # towers only: pulls the adapters back to the identity
    negatives: int = 100  # hard negatives per query, from the documents the beam reaches
    train_fraction: float = 0.10  # beam for the hard negatives: this share of the leaves
    scale: float = 20.0  # retrieval logits = scale * score (unit-norm embeddings)
    retrieval_weight: float = 1.0
    routing_weight: float = 1.0
    doc_weight: float = 1.0
    balance_weight: float = 1.0
    docs_per_step: int = 256  # random documents per step for the document and balance terms
    reassign_every: int = 2  # epochs between re-assignments of the documents to leaves
    val_fraction: float = 0.2
    holdout: str = "random"  # or "disjoint" (see jpq.train.holdout_split)
    val_fractions: tuple = TARGET_FRACTIONS  # validation: mean of (nDCG@10 + Recall@100) / 2 at these
    patience: int = 5
    seed: int = 0

    def __post_init__(self):
        self.val_fractions = tuple(float(f) for f in self.val_fractions)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        for name in ("epochs", "batch_size", "negatives", "reassign_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.holdout not in ("random", "disjoint"):
            raise ValueError(f"holdout must be 'random' or 'disjoint', got {self.holdout!r}")
        if not self.val_fractions or any(not 0.0 < f <= 1.0 for f in self.val_fractions):
            raise ValueError(f"val_fractions must be fractions in (0, 1], got {self.val_fractions}")


class TreeRouter(nn.Module):
    """The trainable routing parameters of a TreeIndex (node embeddings, biases, log-scales)."""

    def __init__(self, index: TreeIndex):
        super().__init__()
        emb, bia, ls = index.routing_params()
        self.branching = index.branching
        self.embeddings = nn.ParameterList([nn.Parameter(e) for e in emb])
        self.biases = nn.ParameterList([nn.Parameter(c) for c in bia])
        self.log_scales = nn.Parameter(ls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, d) -> leaf log-probabilities (n, n_leaves)."""
        return leaf_log_probs(x, list(self.embeddings), list(self.biases), self.log_scales, self.branching)

    def params(self):
        return [e.detach() for e in self.embeddings], [c.detach() for c in self.biases], self.log_scales.detach()


def _atomic_torch_save(payload, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class TreeTrainer:
    """Train the tree's routing jointly with the query tower (and optionally a document tower).

    Args:
        config: TreeConfig.
        index: a trained TreeIndex holding `doc_embeddings` (k-means tree + PQ codes); it is the
            epoch-0 model and is left unchanged (see `trained_index`).
        doc_embeddings: shape=(N, d) float32, the frozen document encoder's vectors, row = doc id.
        query_ids: training query ids; qrels {query_id: {doc_row: relevance}} over them.
        query_embeddings: {query_id: (d,) vector} for a vector-to-vector tower (the default,
            `ResidualLinear(d)`, on frozen encoder outputs), or
        query_texts: {query_id: text} with `query_tower` a text encoder module (e.g.
            jpq.encoders.SentenceEncoder): any torch module texts -> (n, d) can be trained here.
        query_tower: torch module; default ResidualLinear(d) (identity at step 0).
        doc_tower: optional torch module (N, d) -> (N, d) on the document vectors (e.g.
            ResidualLinear(d)); the leaves and PQ codes are rebuilt from its output.
        out_dir: checkpoints (`checkpoint.pt`, `best.pt`, `history.json`); None keeps nothing.
    """

    def __init__(self, config: TreeConfig, index: TreeIndex, doc_embeddings: np.ndarray, query_ids: list[str],
                 qrels: dict, query_embeddings: dict | None = None, query_texts: dict | None = None,
                 query_tower: nn.Module | None = None, doc_tower: nn.Module | None = None,
                 out_dir: str | Path | None = None, progress: bool = True):
        if not isinstance(config, TreeConfig):
            raise TypeError(f"config must be a TreeConfig, got {type(config).__name__}")
        if not isinstance(index, TreeIndex):
            raise TypeError(f"index must be a TreeIndex, got {type(index).__name__}")
        index._require_trained()
        self.cfg = config
        self.X = index._vectors("doc_embeddings", doc_embeddings)
        if index.ntotal != len(self.X):
            raise ValueError(f"index holds {index.ntotal} documents but doc_embeddings has {len(self.X)} rows")
        if (query_embeddings is None) == (query_texts is None):
            raise ValueError("give exactly one of query_embeddings (vectors) or query_texts (with a text tower)")
        if query_texts is not None and query_tower is None:
            raise ValueError("query_texts need a query_tower that encodes texts")
        self.index0 = index
        self.query_inputs = query_embeddings if query_embeddings is not None else query_texts
        self.texts = query_texts is not None
        self.query_tower = query_tower if query_tower is not None else ResidualLinear(index.d)
        self.doc_tower = doc_tower
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.qrels = {q: {int(d): r for d, r in rel.items() if r > 0} for q, rel in qrels.items()}
        ids = [q for q in query_ids if self.qrels.get(q)]
        missing = [q for q in ids if q not in self.query_inputs]
        if missing:
            raise ValueError(f"{len(missing)} training queries have no embedding/text, e.g. {missing[:3]}")
        bad = [d for q in ids for d in self.qrels[q] if not 0 <= d < len(self.X)]
        if bad:
            raise ValueError(f"qrels point to document rows outside [0, {len(self.X)}), e.g. {bad[:3]}")
        self.train_ids, self.val_ids = holdout_split(ids, self.qrels, config.val_fraction, config.seed,
                                                     disjoint=config.holdout == "disjoint")
        log.info("tree training on %d queries, validating on %d held-out queries", len(self.train_ids),
                 len(self.val_ids))
        self.router = TreeRouter(index)
        groups = [{"params": list(self.router.parameters()), "lr": config.lr_nodes, "weight_decay": 0.0},
                  {"params": [p for p in self.query_tower.parameters() if p.requires_grad],
                   "lr": config.lr_query, "weight_decay": config.weight_decay}]
        if doc_tower is not None:
            groups.append({"params": [p for p in doc_tower.parameters() if p.requires_grad],
                           "lr": config.lr_doc, "weight_decay": config.weight_decay})
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
        self.X_t = torch.from_numpy(self.X)
        self.state = TrainState()
        self.train_beam = max(1, math.ceil(config.train_fraction * index.n_leaves))
        self.leaf_of = index.leaf_of.copy()
        self._refresh_documents(index.pq, reassign=False)

    # ------------------------------------------------------------------ state of the documents
    def _doc_vectors(self, rows=None, grad: bool = False) -> torch.Tensor:
        x = self.X_t if rows is None else self.X_t[rows]
        if self.doc_tower is None:
            return x
        with torch.set_grad_enabled(grad):
            return self.doc_tower(x)

    def _refresh_documents(self, pq: PQIndex, reassign: bool = True, retrain_pq: bool = False):
        """Leaves (most probable paths under the current routing) and PQ reconstructions of the
        current document vectors. Without a document tower the codes never change."""
        xd = self._doc_vectors().detach().float().numpy()
        pq = copy.deepcopy(pq)
        if self.doc_tower is not None:
            if retrain_pq:
                xr = pq.rotate(xd)
                pq.centroids = train_pq_centroids(xr, pq.M, pq.K, niter=8, seed=self.cfg.seed, init=pq.centroids)
            pq.codes = pq.encode(xd)
        self.pq = pq
        self.xhat = torch.from_numpy(pq.decode(pq.codes))  # what search scores
        if reassign:
            self.leaf_of = self._snapshot(with_queries=False).assign_leaves(xd)

    def _snapshot(self, with_queries: bool = True, leaves: np.ndarray | None = None) -> TreeIndex:
        """A TreeIndex of the current parameters (shares the PQ arrays)."""
        idx = copy.copy(self.index0)
        idx.pq = self.pq
        idx.set_routing(*self.router.params())
        idx.query_matrix = (self.query_tower.matrix()
                            if with_queries and isinstance(self.query_tower, ResidualLinear) else None)
        idx.leaf_of = self.leaf_of if leaves is None else leaves
        idx._lists = None
        return idx

    # ------------------------------------------------------------------ queries
    def _queries(self, ids: list[str], grad: bool) -> torch.Tensor:
        """Query tower outputs (B, d) for known query ids."""
        if self.texts:
            inp = [self.query_inputs[q] for q in ids]
        else:
            inp = torch.from_numpy(np.stack([np.asarray(self.query_inputs[q], np.float32) for q in ids]))
        if grad:
            return self.query_tower(inp)
        with torch.no_grad():
            was = self.query_tower.training
            self.query_tower.eval()
            out = self.query_tower(inp)
            self.query_tower.train(was)
            return out.float()

    def encode_queries(self, q) -> np.ndarray:
        """The trained tower's output for query vectors (n, d) (or texts with a text tower):
        what to pass to `trained_index().search` when the tower is not a ResidualLinear."""
        with torch.no_grad():
            self.query_tower.eval()
            inp = list(q) if self.texts else torch.from_numpy(to_numpy_f32(q))
            return self.query_tower(inp).float().numpy()

    # ------------------------------------------------------------------ evaluation
    def evaluate_ids(self, ids: list[str], fractions=None, k: int = 100) -> dict:
        """{fraction: metrics} on queries `ids` (training qrels), each at the beam whose measured
        fraction scored on these queries is closest to the target; plus "score", the selection
        criterion (mean over fractions of (nDCG@10 + Recall@100) / 2)."""
        fractions = self.cfg.val_fractions if fractions is None else fractions
        idx = self._snapshot(with_queries=False, leaves=self._val_leaves())
        q = np.concatenate([self._queries(ids[s : s + 256], grad=False).numpy() for s in range(0, len(ids), 256)])
        qrels = {i: {str(d): r for d, r in self.qrels[i].items()} for i in ids}
        doc_ids = [str(i) for i in range(len(self.X))]
        out, scores = {}, []
        for f in fractions:
            beam, measured = idx.beam_for_fraction(q, f)
            _, I = idx.search(q, k, beam)
            m = evaluate((I, ids, doc_ids), qrels, ("ndcg@10", "recall@100", "mrr@10"))
            out[f] = {"beam": beam, "fraction_scored": measured, **m}
            scores.append(0.5 * (m["ndcg@10"] + m["recall@100"]))
        out["score"] = float(np.mean(scores))
        return out

    def _val_leaves(self) -> np.ndarray:
        """The leaves the trained index would hold: most probable paths under the current routing."""
        return self._snapshot(with_queries=False).assign_leaves(self._doc_vectors().detach().float().numpy())

    # ------------------------------------------------------------------ one step
    def _candidates(self, ids, qv: torch.Tensor, idx: TreeIndex):
        """(B, P) candidate rows: positives (padded by repetition), then the hard negatives the
        beam reaches, best-scored first under the current tower."""
        leaves, score = idx.probe(qv.numpy(), self.train_beam, transformed=True)
        offsets, order, _ = idx._inverted_lists()
        n_pos = max(len(self.qrels[i]) for i in ids)
        P = n_pos + self.cfg.negatives
        cand = np.zeros((len(ids), P), np.int64)
        pos_mask = np.zeros((len(ids), P), bool)
        valid = np.zeros((len(ids), P), bool)
        for b, qid in enumerate(ids):
            pos = list(self.qrels[qid])
            cand[b, :n_pos] = (pos * n_pos)[:n_pos]
            pos_mask[b, : len(pos)] = valid[b, : len(pos)] = True
            reached = leaves[b][np.isfinite(score[b])]
            rows = np.concatenate([order[offsets[l] : offsets[l + 1]] for l in reached]) if len(reached) else []
            rows = np.asarray([r for r in rows if r not in self.qrels[qid]], np.int64)
            if len(rows) > self.cfg.negatives:
                s = (self.xhat[torch.from_numpy(rows)] @ qv[b]).numpy()
                rows = rows[np.argsort(-s, kind="stable")[: self.cfg.negatives]]
            cand[b, n_pos : n_pos + len(rows)] = rows
            valid[b, n_pos : n_pos + len(rows)] = True
        return cand, torch.from_numpy(pos_mask), torch.from_numpy(valid)

    def step(self, ids: list[str], doc_sample: np.ndarray, idx: TreeIndex) -> dict:
        cfg = self.cfg
        qv = self._queries(ids, grad=True)
        cand, pos_mask, valid = self._candidates(ids, qv.detach().float(), idx)
        # retrieval: positives vs the tree's own hard negatives, scored as search scores them
        if self.doc_tower is None:
            docs = self.xhat[torch.from_numpy(cand)]
        else:  # exact projected vectors carry the gradient to the document tower
            docs = self._doc_vectors(torch.from_numpy(cand.reshape(-1)), grad=True).reshape(*cand.shape, -1)
        if self.index0.metric == "ip":
            scores = torch.einsum("bd,bpd->bp", qv, docs)
        else:
            scores = -((qv.unsqueeze(1) - docs) ** 2).sum(-1)
        retrieval = ce_loss(cfg.scale * scores, pos_mask, valid)
        # routing: probability that the query's path ends in one of its positives' leaves
        lq = self.router(qv)
        target = torch.zeros_like(lq, dtype=torch.bool)
        for b, qid in enumerate(ids):
            target[b, torch.from_numpy(self.leaf_of[list(self.qrels[qid])])] = True
        routing = -(torch.logsumexp(lq.masked_fill(~target, -math.inf), 1)).mean()
        # documents stay in their leaves (sample + positives); balance over the sampled documents
        pos_rows = np.unique(np.concatenate([list(self.qrels[q]) for q in ids]))
        rows = torch.from_numpy(np.unique(np.concatenate([doc_sample, pos_rows])))
        ld = self.router(self._doc_vectors(rows, grad=True))
        doc = -ld.gather(1, torch.from_numpy(self.leaf_of)[rows].unsqueeze(1)).mean()
        mean_p = ld.exp().mean(0)
        balance = (mean_p * (mean_p.clamp_min(1e-12) * lq.shape[1]).log()).sum()  # KL(mean || uniform)
        loss = (cfg.retrieval_weight * retrieval + cfg.routing_weight * routing + cfg.doc_weight * doc
                + cfg.balance_weight * balance)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "retrieval": float(retrieval.detach()),
                "routing": float(routing.detach()), "doc": float(doc.detach()), "balance": float(balance.detach())}

    # ------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict:
        return {"router": copy.deepcopy(self.router.state_dict()),
                "query_tower": copy.deepcopy(self.query_tower.state_dict()),
                "doc_tower": None if self.doc_tower is None else copy.deepcopy(self.doc_tower.state_dict()),
                "leaf_of": self.leaf_of.copy(), "pq": copy.deepcopy(self.pq)}

    def _load_model_state(self, st: dict):
        self.router.load_state_dict(st["router"])
        self.query_tower.load_state_dict(st["query_tower"])
        if self.doc_tower is not None:
            self.doc_tower.load_state_dict(st["doc_tower"])
        self.leaf_of = st["leaf_of"].copy()
        self.pq = copy.deepcopy(st["pq"])
        self.xhat = torch.from_numpy(self.pq.decode(self.pq.codes))

    def _checkpoint(self, best_state: dict):
        if self.out_dir is None:
            return
        _atomic_torch_save({"config": asdict(self.cfg), "state": asdict(self.state), "model": self._model_state(),
                            "best": best_state, "optimizer": self.optimizer.state_dict()},
                           self.out_dir / "checkpoint.pt")
        (self.out_dir / "history.json").write_text(json.dumps(self.state.history, indent=1))

    def _resume(self):
        path = self.out_dir / "checkpoint.pt" if self.out_dir else None
        if path is None or not path.exists():
            return None
        ck = torch.load(path, weights_only=False)
        if ck["config"] != asdict(self.cfg):
            raise ValueError(f"{path} was written with a different configuration; use a new out_dir")
        self._load_model_state(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.state = TrainState(**ck["state"])
        log.info("resumed from %s after epoch %d", path, self.state.epoch)
        return ck["best"]

    # ------------------------------------------------------------------ loop
    def _validate(self) -> tuple[float, dict]:
        if not self.val_ids:
            return 0.0, {}
        res = self.evaluate_ids(self.val_ids)
        return res["score"], {str(f): v for f, v in res.items() if f != "score"}

    def fit(self, resume: bool = False, stop_after_epoch: int | None = None) -> list:
        """Train, select the best epoch on the held-out queries, and load it.

        stop_after_epoch: stop (as if interrupted) once that many epochs are complete.
        Returns the history (one record per epoch; epoch 0 = the k-means tree).
        """
        cfg = self.cfg
        best_state = self._resume() if resume else None
        if self.state.epoch == 0 and not self.state.history:
            score, detail = self._validate()
            self.state.history.append({"epoch": 0, "val": score, "val_detail": detail, "seconds": 0.0})
            self.state.best_score, self.state.best_epoch = score, 0
            best_state = self._model_state()
            log.info("epoch 0 (k-means tree): val %.4f", score)
        while self.state.epoch < cfg.epochs:
            if self.state.epoch - self.state.best_epoch >= cfg.patience:
                log.info("early stop: no validation gain for %d epochs", cfg.patience)
                break
            if stop_after_epoch is not None and self.state.epoch >= stop_after_epoch:
                return self.state.history
            epoch = self.state.epoch + 1
            t0 = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, epoch])
            order = rng.permutation(len(self.train_ids))
            batches = [[self.train_ids[i] for i in order[s : s + cfg.batch_size]]
                       for s in range(0, len(order), cfg.batch_size)]
            samples = [rng.choice(len(self.X), min(cfg.docs_per_step, len(self.X)), replace=False) for _ in batches]
            self.query_tower.train()
            logs = []
            with torch.random.fork_rng(devices=[]):  # dropout in a text tower: same draws on resume
                torch.manual_seed(cfg.seed * 100_003 + epoch)
                for ids, sample in tqdm(list(zip(batches, samples)), desc=f"tree epoch {epoch}",
                                        disable=not self.progress, leave=False):
                    idx = self._snapshot(with_queries=False)
                    logs.append(self.step(ids, sample, idx))
            self.query_tower.eval()
            if epoch % cfg.reassign_every == 0:
                self._refresh_documents(self.pq, reassign=True, retrain_pq=True)
            score, detail = self._validate()
            rec = {"epoch": epoch, "val": score, "val_detail": detail, "seconds": time.perf_counter() - t0,
                   **{k: float(np.mean([l[k] for l in logs])) for k in logs[0]}}
            self.state.history.append(rec)
            self.state.epoch = epoch
            if score > self.state.best_score:
                self.state.best_score, self.state.best_epoch = score, epoch
                best_state = self._model_state()
            log.info("epoch %d: loss %.4f, val %.4f (best %.4f at epoch %d)", epoch, rec["loss"], score,
                     self.state.best_score, self.state.best_epoch)
            self._checkpoint(best_state)
        self._load_model_state(best_state)
        if self.out_dir is not None:
            _atomic_torch_save({"config": asdict(cfg), "state": asdict(self.state), "model": best_state},
                               self.out_dir / "best.pt")
        return self.state.history

    # ------------------------------------------------------------------ results
    def trained_index(self) -> TreeIndex:
        """A TreeIndex with the trained routing, the documents at their most probable leaves, and
        (for a ResidualLinear tower) the query tower as `query_matrix`."""
        idx = self._snapshot(with_queries=True, leaves=self._val_leaves())
        idx.pq = copy.deepcopy(self.pq)
        idx.leaf_of = idx.leaf_of.copy()
        return idx
