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

Initialised by hierarchical k-means (`kmeans_metric`): L2 k-means with c_j = -||e_j||^2 / 2 (the
argmax child is the nearest centroid), or inner-product k-means with c_j = 0 (the largest x . e,
as faiss' inner-product IVF assigns). So the k-means tree routes exactly like an IVF tree.
A document's leaf is its most probable path as found by beam search of width `doc_beam` (1 by
default: greedy descent, which at step 0 is exactly the hierarchical k-means assignment); a
query is routed by beam search: at every level the `beam` best nodes by path log-probability
are kept and expanded, and the documents of the `beam` leaves reached are scored. Empty
subtrees are masked out of the beam. The beam width sets the fraction of documents scored
(`fraction_scored`). With `centroid_share` > 0 (the trained index's default, 0.5) only the
routing's best beam - floor(share * beam) leaves are kept and the rest of the beam goes to the
leaves whose centroid (mean PQ reconstruction of their documents) scores highest: IVF-style over
the learned partition, which covers the queries the learned routing generalises worst to.

Leaves store their documents as PQ codes (a `PQIndex` inside, raw vectors, not residuals): search
scores the codes of each query's reached leaves with the inverted-list ADC kernel
(`jpq.kernels.ivf.ivf_search`, over a leaf-ordered copy of the codes) and keeps an exact top-k per
query (ties by smaller id), so a beam covering every leaf returns what `PQIndex.search` returns on
the same codes: bitwise for more than FEW_QUERIES (12) queries at a time; for 1-12, where `PQIndex.search`
sums in a vectorised order, scores to float32 rounding and ids but for near-ties.

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
  - distillation: cross-entropy from the leaf distribution of the query's exact top-20
    documents under the current tower (label-free routing targets over many more documents);
  - document loss: -log p(leaf(d) | d) over a sample of documents plus the positives (keeps the
    tree a clustering of the documents, so that moving nodes for queries does not scatter them);
  - balance: KL(mean leaf distribution of the sampled documents || uniform) (no collapse).
Documents are re-assigned to their most probable leaves every `reassign_every` epochs.
Validation on held-out training queries (held-out part of train, never test) at the target
fractions; epoch 0 is the k-means tree, so the selected model is never worse on validation.

Measured on SciFact test (bench/results/tree_scifact.md, 64 leaves, no test tuning): the trained
tree beats faiss IVF-Flat / IVF-PQ and its k-means init in nDCG@10 at 5-20% scored (+0.14 to +0.19,
paired bootstrap intervals well above 0) and in Recall@100 at 5% (+0.09); at 10% and 20% its
Recall@100 is level with IVF (tree minus IVF-PQ +0.015 [-0.031, +0.058] and -0.011 [-0.050, +0.026]).
On test queries whose positives were never training positives it routes worse than its own
k-means init: the learned routing favours the leaves of training positives (64% of SciFact's
test positives are among them).
On held-out training queries (bench/results/tree_heldout.md: 6 outer seeds, test never read) it is
higher than IVF-Flat, IVF-PQ and its init at 5%, 10% and 20% on every seed (Recall@100 at 20%: 0.928
vs 0.876 for IVF-PQ, mean), with the same weak spot on queries whose positives are new documents.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .index import PQIndex, VectorIndexInput, _check_radius, matmul_t, searches_on_device, train_pq_centroids
from .kernels import adc_scores, assign
from .kernels.ivf import ivf_search
from .kernels.arrays import array_kind, check_int, check_k, check_metric, to_numpy_f32
from .kernels.dispatch import BACKENDS
from .metrics import evaluate, mean_over_queries, paired_bootstrap, per_query
from .storage import atomic_write_json, read_container, write_container
from .train import Checkpointing, TrainState, ce_loss, check_fields, check_holdout, fit_and_refit, holdout_split

log = logging.getLogger(__name__)

FORMAT_MAGIC = b"JPQTREE\0"
FORMAT_VERSION = 1
TARGET_FRACTIONS = (0.05, 0.10, 0.20)


# --------------------------------------------------------------------------- threads
@contextlib.contextmanager
def _threads(n: int | None, get, set_):
    """Thread count set_(n) inside the block (None: unchanged), get()'s value restored after."""
    if n is None:
        yield
        return
    old = get()
    set_(n)
    try:
        yield
    finally:
        set_(old)


def _torch_threads(n: int | None):
    """torch intra-op threads inside the block."""
    return _threads(n, torch.get_num_threads, torch.set_num_threads)


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
def _nearest(x: np.ndarray, C: np.ndarray, metric: str) -> np.ndarray:
    """Index of the best centroid per row: max inner product ("ip") or min L2 ("l2"); ties go to
    the smaller index."""
    if metric == "l2":
        return assign(x, C[None])[:, 0].astype(np.int64)
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), 16384):
        out[s : s + 16384] = (x[s : s + 16384] @ C.T).argmax(1)
    return out


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, metric: str = "l2") -> np.ndarray:
    """k-means of x (n, d) -> (k, d) float32 centroids.

    metric "l2": Lloyd on the assign kernel (`train_pq_centroids` with one subspace). metric "ip":
    assignment by maximum inner product, centroid = mean of its members (what faiss trains for an
    inner-product IVF); an empty cluster takes the member of the largest cluster least similar to
    its centroid. On SciFact (64 lists, MiniLM) IP k-means matched faiss' IVF lists in Recall@100
    (0.699 / 0.796 / 0.875 at 3 / 6 / 12 probes) where L2 k-means gave 0.681 / 0.767 / 0.855.
    With n <= k the n points are used and the missing centroids repeat the last point (their leaves
    stay empty: ties go to the smallest index).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n == 0:
        raise ValueError("k-means of an empty set")
    if n <= k:
        return np.concatenate([x, np.repeat(x[-1:], k - n, 0)]).astype(np.float32)
    if metric == "l2":
        return train_pq_centroids(x, 1, k, niter=niter, seed=seed)[0]
    rng = np.random.default_rng(seed)
    C = x[rng.choice(n, k, replace=False)].copy()
    xt = torch.from_numpy(x).double()
    for _ in range(niter):
        lab = _nearest(x, C, "ip")
        counts = np.bincount(lab, minlength=k)
        sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, torch.from_numpy(lab), xt).numpy()
        newC = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        for j in np.nonzero(counts == 0)[0]:
            big = int(counts.argmax())
            members = np.nonzero(lab == big)[0]
            far = members[(x[members] @ newC[big]).argmin()]
            newC[j] = x[far]
            lab[far] = j
            counts[big] -= 1
            counts[j] = 1
        C = newC
    return C


def hierarchical_kmeans(x: np.ndarray, branching: Sequence[int], niter: int = 20, seed: int = 0,
                        metric: str = "l2") -> list[np.ndarray]:
    """Top-down k-means: level l clusters each level-(l-1) cluster's members into b_l children
    (members follow their best centroid under `metric`, as an IVF quantizer assigns).

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
            C = kmeans(x[rows], b, niter=niter, seed=seed + 7919 * level + j, metric=metric)
            cents.append(C)
            lab = _nearest(x[rows], C, metric)
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
    return path_log_probs(level_log_probs(x, embeddings, biases, log_scales, branching), branching)


def path_log_probs(logps: Sequence[torch.Tensor], branching: Sequence[int]) -> torch.Tensor:
    """Every leaf's path log-probability from the per-level conditional ones (`level_log_probs`):
    out[:, leaf] = sum over levels of log p(node on the leaf's path | its parent)."""
    n = logps[0].shape[0]
    total = logps[0].new_zeros((n, 1))
    for logp, b in zip(logps, branching):  # explicit sizes, no -1: n may be 0
        parents = total.shape[1]
        total = (total.unsqueeze(-1) + logp.reshape(n, parents, b)).reshape(n, parents * b)
    return total


def level_log_probs(x, embeddings, biases, log_scales, branching):
    """Per-level conditional log-probabilities log p(node | parent, x): list of (n, n_l)."""
    n = x.shape[0]
    out = []
    for level, b in enumerate(branching):
        z = (x @ embeddings[level].T + biases[level]) * log_scales[level].exp()
        nodes = z.shape[1]  # explicit sizes, no -1: n may be 0
        out.append(F.log_softmax(z.reshape(n, nodes // b, b), dim=-1).reshape(n, nodes))
    return out


@torch.no_grad()
def beam_search(x: torch.Tensor, embeddings, biases, log_scales, branching, beam: int,
                node_counts: Sequence[np.ndarray] | None = None, logps: Sequence[torch.Tensor] | None = None):
    """Route x (n, d) down the tree keeping the `beam` best nodes (by path log-probability) per
    level. node_counts[l] (n_l,): documents under each node; nodes with none are skipped.

    Returns leaves shape=(n, w) int64 (w = min(beam, n_leaves)), best first, and their path
    log-probabilities shape=(n, w) (-inf where fewer than w non-empty leaves exist).
    The per-level logits are one GEMM over all nodes of the level (for trees of a few thousand
    nodes that is cheaper than gathering each query's children), then pruned to the beam.
    `logps`: those levels' `level_log_probs(x, ...)` when the caller has them already.
    """
    n = x.shape[0]
    if logps is None:
        logps = level_log_probs(x, embeddings, biases, log_scales, branching)
    score = x.new_zeros((n, 1))
    nodes = torch.zeros((n, 1), dtype=torch.int64)
    for level, b in enumerate(branching):
        children = (nodes.unsqueeze(-1) * b + torch.arange(b)).reshape(n, nodes.shape[1] * b)  # n may be 0
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
class TreeIndex(VectorIndexInput):
    """A tree of learned routing nodes over PQ-coded leaves.

    Args:
        d: vector dimension.
        branching: children per node at each level, e.g. (8, 8) = 64 leaves (`default_branching`).
        M, nbits, opq: the leaves' PQ (see `PQIndex`); M defaults to `default_pq_m(d)`.
        metric: "ip" or "l2": how the leaves' documents are scored.
        kmeans_metric: the k-means of the tree and its step-0 routing: "l2" (nearest centroid,
            bias -||e||^2/2) or "ip" (max inner product, bias 0: faiss' inner-product IVF). "ip"
            gives the better k-means tree on SciFact, but the *trained* tree validated better from
            "l2" on three hold-out seeds (0.804 / 0.831 / 0.791 vs 0.783 / 0.809 / 0.771, mean of
            nDCG@10 and Recall@100 at 5-20%), so "l2" is the default for every metric.
        init_scale: routing inverse temperature s_l at initialisation (learned afterwards). It sets
            how soft query routing is at step 0, not where documents go (see doc_beam).
        doc_beam: beam width that finds a document's most probable path (`assign_leaves`).
        centroid_share: the share of each query's `beam` leaves chosen by the leaf's centroid
            (the mean PQ reconstruction of the documents it holds) rather than by the routing
            tree: floor(share * beam) leaves, IVF-style over the (learned) partition, after the
            routing's best beam - floor(share * beam). 0: routing only. The trainer sets it from
            TreeConfig.centroid_share (see there for why).

    Attributes (NumPy, float32 unless stated):
        embeddings[l]: shape=(n_l, d); biases[l]: shape=(n_l,); log_scales: shape=(L,).
        query_matrix: shape=(d, d) or None; search maps q -> q @ query_matrix.T first (the
            trained `ResidualLinear` tower).
        leaf_of: shape=(ntotal,) int64, each document's leaf.
        pq: the PQIndex holding the codes (pq.codes shape=(ntotal, M) uint8, global id order).
    """

    def __init__(self, d: int, branching: Sequence[int] = (8, 8), M: int | None = None, nbits: int = 8,
                 metric: str = "ip", opq: bool = False, init_scale: float = 20.0, doc_beam: int = 1,
                 kmeans_metric: str = "l2", centroid_share: float = 0.0):
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
        self.doc_beam = _check_beam(doc_beam)
        self.kmeans_metric = check_metric(kmeans_metric)
        self.centroid_share = centroid_share  # validated by the property setter
        self.embeddings: list[np.ndarray] | None = None
        self.biases: list[np.ndarray] | None = None
        self.log_scales: np.ndarray | None = None
        self.query_matrix: np.ndarray | None = None
        self.leaf_of = np.empty(0, np.int64)
        self._lists = None
        self._leaf_means = None  # (what it was computed from, (n_leaves, d) means)
        self._list_codes_cache = None  # (what it was computed from, leaf-ordered codes)
        self._device_cache = None  # (device, what it was copied from, tensors) for device searches

    _CACHES = ("_lists", "_leaf_means", "_list_codes_cache", "_device_cache")  # rebuilt on demand

    def __getstate__(self) -> dict:
        """pickle / copy state with the caches emptied (no device tensors, no stale lists)."""
        return {k: (None if k in self._CACHES else v) for k, v in self.__dict__.items()}

    # ------------------------------------------------------------------ properties
    @property
    def M(self) -> int:
        return self.pq.M

    @property
    def centroid_share(self) -> float:
        return self._centroid_share

    @centroid_share.setter
    def centroid_share(self, share) -> None:
        self._centroid_share = _check_share(share)

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
        return q if self.query_matrix is None else matmul_t(q, self.query_matrix)

    # ------------------------------------------------------------------ build
    def train(self, x, niter: int = 20, seed: int = 0, pq_niter: int = 25, max_train_points: int | None = 65536):
        """Hierarchical k-means for the routing nodes and the leaves' PQ codebooks, from x (n, d)
        with n >= 2**nbits. kmeans_metric "l2": L2 k-means, biases -||e||^2/2 (nearest centroid);
        "ip": inner-product k-means, biases 0 (routing by x . e, as faiss' inner-product IVF)."""
        x = self._vectors("x", x)
        if x.shape[0] < self.pq.K:
            raise ValueError(f"training needs at least 2**nbits={self.pq.K} vectors, got {x.shape[0]}")
        if max_train_points is not None and x.shape[0] > max_train_points:
            x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], max_train_points, replace=False))]
        cents = hierarchical_kmeans(x, self.branching, niter=niter, seed=seed, metric=self.kmeans_metric)
        if self.kmeans_metric == "ip":  # route by x . e, as an inner-product IVF quantizer
            biases = [np.zeros(len(c), np.float32) for c in cents]
        else:  # x . e - ||e||^2 / 2: the nearest centroid in L2
            biases = [-0.5 * (c.astype(np.float64) ** 2).sum(1) for c in cents]
        self.set_routing(cents, biases, np.full(self.levels, math.log(self.init_scale), np.float32))
        self.pq.train(x, niter=pq_niter, seed=seed + 1, max_train_points=None)
        return self

    def assign_leaves(self, x, batch: int = 4096) -> np.ndarray:
        """Leaf of each row of x (n, d): the most probable path found by beam search of width
        `doc_beam` (1: greedy descent, the default, which at step 0 is exactly the hierarchical
        k-means assignment of an IVF tree; >= n_leaves: the exact argmax of the joint)."""
        self._require_trained()
        x = self._vectors("x", x)
        emb, bia, ls = self.routing_params()
        out = np.empty(len(x), np.int64)
        with torch.no_grad():
            for s in range(0, len(x), batch):
                xs = torch.from_numpy(x[s : s + batch])
                if self.doc_beam >= self.n_leaves:
                    out[s : s + batch] = leaf_log_probs(xs, emb, bia, ls, self.branching).argmax(1).numpy()
                else:
                    out[s : s + batch] = beam_search(xs, emb, bia, ls, self.branching, self.doc_beam)[0][:, 0].numpy()
        return out

    def add(self, x):
        """Route x (n, d) to their most probable leaves and append their PQ codes; ids continue
        from ntotal."""
        self._require_trained()
        x = self._vectors("x", x)
        self.pq._check_mix(False, "add")  # before the routing, which costs more than the check
        leaves = self.assign_leaves(x)
        self.pq.add(x)
        self.leaf_of = np.concatenate([self.leaf_of, leaves])
        self._lists = None

    def add_with_ids(self, x, ids):
        """Route x (n, d) to their leaves and append them under `ids` (n,) integers >= 0, which
        `search` then returns instead of positions (as faiss' IndexIVFPQ.add_with_ids; an index
        holds vectors added with ids or without, not both, as `PQIndex.add_with_ids`)."""
        self._require_trained()
        x = self._vectors("x", x)
        ids = self.pq._check_ids(ids, len(x))  # before the routing: a bad id costs nothing
        self.pq._check_mix(True, "add_with_ids")
        leaves = self.assign_leaves(x)
        self.pq.add_with_ids(x, ids)
        self.leaf_of = np.concatenate([self.leaf_of, leaves])
        self._lists = None

    @property
    def ids(self) -> np.ndarray | None:
        """(ntotal,) int64 ids of vectors added with `add_with_ids`, or None (ids are positions)."""
        return self.pq.ids

    def remove_ids(self, ids) -> int:
        """Remove the documents whose id is in `ids` (an array of integers or a faiss IDSelector;
        see `PQIndex.remove_ids`); return how many were removed. The routing parameters and the
        other documents' leaves are unchanged, but which leaves a query probes may change: beam
        search skips leaves left empty, and the centroid share ranks leaves by the mean of the
        documents they hold now (faiss' fixed quantizer probes the same lists whatever they hold,
        so there, removing documents equals filtering them out with a selector; here it need not). Without ids, `ids` are positions and the later ones shift down, as
        in `PQIndex` (faiss' IVF indexes, which always store ids, keep the others' labels: add
        with `add_with_ids` for that)."""
        keep = self.pq._rows_kept(ids)
        if not keep.all():
            self.pq._keep_rows(keep)
            self.leaf_of = np.ascontiguousarray(self.leaf_of[keep])
            self._lists = None
        return int(len(keep) - keep.sum())

    def reconstruct(self, i: int) -> np.ndarray:
        """The PQ reconstruction of id `i` (its position in an index without ids)."""
        return self.pq.reconstruct(i)

    def reconstruct_batch(self, keys) -> np.ndarray:
        """PQ reconstructions (n, d) of the ids `keys` (see `PQIndex.reconstruct_batch`)."""
        return self.pq.reconstruct_batch(keys)

    def reconstruct_n(self, i0: int = 0, n: int | None = None) -> np.ndarray:
        """PQ reconstructions of ids i0 .. i0 + n - 1 (see `PQIndex.reconstruct_n`)."""
        return self.pq.reconstruct_n(i0, n)

    def merge_from(self, other: "TreeIndex", add_id: int = 0) -> None:
        """Move `other`'s documents, with their leaves, to the end of this index, as faiss'
        IVF `merge_from` (`other` is emptied; `add_id` as `PQIndex.merge_from`). Both must share
        the tree (branching, routing parameters, query matrix; compared in float32, as routed)
        and the PQ quantizer: ValueError naming what differs. As with `remove_ids`, the merged
        index may probe other leaves than each shard did (empty leaves, leaf centroids)."""
        if not isinstance(other, TreeIndex):
            raise TypeError(f"other must be a TreeIndex, got {type(other).__name__}")
        if other is self:
            raise ValueError("cannot merge an index into itself")
        if self.branching != other.branching:
            raise ValueError(f"cannot merge: branching differs ({self.branching} here, {other.branching} in other)")
        self._require_trained()
        other._require_trained()
        mine = self.embeddings + self.biases + [self.log_scales]
        theirs = other.embeddings + other.biases + [other.log_scales]
        same = (lambda a, b: np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)))  # routed in float32
        if any(not same(a, b) for a, b in zip(mine, theirs)):
            raise ValueError("cannot merge: the routing parameters differ (leaves are only comparable in the same tree)")
        if (self.query_matrix is None) != (other.query_matrix is None) or (
                self.query_matrix is not None and not same(self.query_matrix, other.query_matrix)):
            raise ValueError("cannot merge: the query matrices differ")
        leaves = other.leaf_of
        self.pq.merge_from(other.pq, add_id)  # checks the quantizer and the ids; empties other.pq
        self.leaf_of = np.concatenate([self.leaf_of, leaves])
        self._lists = None
        other.reset()

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
        self._list_codes_cache = self._leaf_means = None
        self.drop_device_copies()

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

    def _list_codes(self) -> np.ndarray:
        """The PQ codes in inverted-list order (row t is document `ids[t]` of `_inverted_lists`),
        as faiss' inverted lists store them: a query's scan reads its leaves' codes contiguously.
        Cached until the leaves or the codes change."""
        lists = self._inverted_lists()
        key = (lists, self.pq.codes)
        cache = self._list_codes_cache
        if cache is None or any(a is not b for a, b in zip(cache[0], key)):
            cache = (key, np.ascontiguousarray(self.pq.codes[lists[1]]))
            self._list_codes_cache = cache
        return cache[1]

    def leaf_centroids(self) -> np.ndarray:
        """Mean PQ reconstruction of each leaf's documents, shape=(n_leaves, d) float32 (zeros
        for an empty leaf); cached until the leaves change."""
        lists = self._inverted_lists()
        key = (lists, self.pq, self.pq.codes, self.pq.centroids, self.pq.rotation)
        if self._leaf_means is None or any(a is not b for a, b in zip(self._leaf_means[0], key)):
            offsets, ids, _ = lists
            means = np.zeros((self.n_leaves, self.d), np.float32)
            for leaf in np.flatnonzero(np.diff(offsets)):
                docs = ids[offsets[leaf] : offsets[leaf + 1]]
                means[leaf] = self.pq.decode(self.pq.codes[docs]).mean(0, dtype=np.float64)
            self._leaf_means = (key, means)
        return self._leaf_means[1]

    def _add_centroid_leaves(self, q: np.ndarray, leaves: np.ndarray, score: np.ndarray, share: float,
                             logps: list[torch.Tensor]):
        """Keep the routing's best w - floor(share * w) leaves of each query and fill the beam with
        the leaves whose centroids score highest (inner product, or -L2 for metric "l2"). Scores
        become every returned leaf's path log-probability (from the routing's `level_log_probs`
        of q, `logps`)."""
        nq, w = leaves.shape
        n_cent = math.floor(w * share + 1e-9)
        if n_cent == 0 or nq == 0:
            return leaves, score
        n_learn = w - n_cent
        cent = self.leaf_centroids()
        empty = self.leaf_sizes() == 0
        out_leaves = np.empty_like(leaves)
        out_score = np.empty_like(score)
        step = max(1, (1 << 22) // self.n_leaves)  # bounds the (rows, n_leaves) work arrays
        for r0 in range(0, nq, step):
            r1 = min(nq, r0 + step)
            qs = q[r0:r1]
            s = matmul_t(qs, cent)  # not NumPy's GEMM: its idle threads slow the scan after it
            if self.metric != "ip":
                s = 2 * s - (cent * cent).sum(1)
            s[:, empty] = -np.inf
            rows = np.arange(r1 - r0)[:, None]
            rank = np.empty(s.shape, np.float64)
            rank[rows, np.argsort(-s, axis=1, kind="stable")] = np.arange(self.n_leaves)
            prio = np.where(np.isfinite(s), n_learn + rank, np.inf)  # after the routing's leaves
            head, head_ok = leaves[r0:r1, :n_learn], np.isfinite(score[r0:r1, :n_learn])
            prio[rows, head] = np.where(head_ok, np.arange(n_learn), prio[rows, head])
            order = np.argsort(prio, axis=1, kind="stable")[:, :w]
            logp = path_log_probs([lp[r0:r1] for lp in logps], self.branching).numpy()
            out_leaves[r0:r1] = order
            out_score[r0:r1] = np.where(np.isfinite(prio[rows, order]), logp[rows, order], -np.inf)
        return out_leaves, out_score

    # ------------------------------------------------------------------ search
    def probe(self, q, beam: int, transformed: bool = False, centroid_share: float | None = None):
        """Leaves reached by beam search: (leaves (nq, w) int64 best first, path log-probs (nq, w)).
        q (nq, d) goes through `query_matrix` first unless `transformed`. With a centroid share
        (`self.centroid_share` unless given) the last floor(share * w) leaves are the best by
        leaf centroid among those the routing's first leaves do not already hold."""
        self._require_trained()
        beam = _check_beam(beam)
        q = self._vectors("q", q)
        if not transformed:
            q = self.transform_queries(q)
        emb, bia, ls = self.routing_params()
        _, _, counts = self._inverted_lists()
        qt = torch.from_numpy(q)
        with torch.no_grad():
            logps = level_log_probs(qt, emb, bia, ls, self.branching)  # once, for both steps below
        leaves, score = beam_search(qt, emb, bia, ls, self.branching, beam, counts, logps=logps)
        share = self.centroid_share if centroid_share is None else _check_share(centroid_share)
        return self._add_centroid_leaves(q, leaves.numpy(), score.numpy(), share, logps)

    def range_search(self, q, radius: float, beam: int, backend: str = "auto", params=None):
        """Every document within `radius` (inner product > radius for metric "ip", squared L2
        distance < radius for "l2", by ADC) among those in the `beam` leaves each query reaches,
        as faiss' IVF `range_search` with nprobe = beam (and `params.sel` filtering as in
        `search`). Returns lims (nq + 1,) int64, D (lims[-1],) float32, I (lims[-1],) int64;
        query i's results D[lims[i]:lims[i + 1]] in position order (their ids for an index with
        ids). The routing and the scan run on the CPU (backend "cpu" or "reference" for the
        scan; "auto" is "cpu"); torch queries get torch results on their device."""
        kind = array_kind(q=q)
        radius = _check_radius(radius)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton":
            raise ValueError("TreeIndex.range_search scans on the CPU: backend must be 'auto', 'cpu' or 'reference'")
        beam = _check_beam(beam)
        self._check_search_params(params, beam)
        self.pq._require_trained()
        offsets, ids, list_codes = self._selected_lists(self.pq._selected_rows(params))
        qt = self.transform_queries(self._vectors("q", q))
        leaves, score = self.probe(qt, beam, transformed=True)
        lut = self.pq.lut(qt, backend="reference" if backend == "reference" else "cpu")
        parts_n, parts_d, counts = [], [], np.zeros(len(qt), np.int64)
        for i in range(len(qt)):
            reached = leaves[i][np.isfinite(score[i])]
            spans = [slice(offsets[leaf], offsets[leaf + 1]) for leaf in reached]
            cand = np.concatenate([ids[sp] for sp in spans]) if spans else np.zeros(0, np.int64)
            codes = np.concatenate([list_codes[sp] for sp in spans]) if spans else list_codes[:0]
            s = adc_scores(lut[i : i + 1], codes, backend="reference" if backend == "reference" else "cpu")[0]
            order = np.argsort(cand, kind="stable")  # position order, as documented
            cand, s = cand[order], s[order]
            within = s > radius if self.metric == "ip" else s < radius
            parts_n.append(cand[within])
            parts_d.append(s[within].astype(np.float32, copy=False))
            counts[i] = int(within.sum())
        I = np.concatenate(parts_n).astype(np.int64) if parts_n else np.zeros(0, np.int64)
        D = np.concatenate(parts_d) if parts_d else np.zeros(0, np.float32)
        lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return tuple(kind.wrap(a) for a in (lims, D, self.pq._positions_to_ids(I)))

    def fraction_scored(self, q, beam: int) -> float:
        """Mean over the queries q (nq, d) of (documents in the reached leaves) / ntotal."""
        leaves, score = self.probe(q, beam)
        if self.ntotal == 0 or len(leaves) == 0:
            return 0.0
        sizes = np.where(np.isfinite(score), self.leaf_sizes()[leaves], 0)
        return float(sizes.sum(1).mean() / self.ntotal)

    def search(self, q, k: int, beam: int, backend: str = "auto", params=None):
        """k best documents among those in the `beam` leaves each query reaches, by ADC.

        params: a faiss `SearchParameters` whose `sel` (an IDSelector) restricts the search to
        the documents it selects, as faiss' IVF indexes take it: the routing is unchanged (the
        leaves reached are those of the unfiltered search), the reached leaves' unselected
        documents are skipped (see `PQIndex.search`). A `SearchParametersIVF` must have nprobe
        equal to `beam` and max_codes 0 (ValueError otherwise: neither is silently ignored).

        q: shape=(nq, d) float32, NumPy or torch (the frozen encoder's query vectors; the stored
        query tower is applied here). Returns D (nq, k) float32 and I (nq, k) int64 (positions
        0 .. ntotal - 1, or the ids of documents added with `add_with_ids`), best first, ties by
        smaller position, -1 ids (and -FLT_MAX / +FLT_MAX scores) when fewer than k
        documents were scored; torch in, torch out. A beam covering every leaf scores every
        document and returns `PQIndex.search`'s results on the same codes (on the CPU path:
        bitwise for more than 12 queries at a time, else to float32 rounding; module docstring).

        Where it runs: the routing (beam search over the tree, a few small GEMMs) always on the
        CPU. The scan: for torch queries on a CUDA device (backend "auto" with Triton installed,
        or "triton") on that device, by `ivf_search`'s Triton path against copies of the
        leaf-ordered codes, lists and centroids kept there (made on the first such search, remade
        when the index changes; `drop_device_copies()` frees them); else on the CPU.

        CPU scan: one fused pass (`jpq.kernels.ivf.ivf_search`, parallel over queries): each query
        builds its look-up table, scores the leaf-ordered PQ codes of its reached leaves and keeps
        its top-k in a heap. 300 SciFact test queries at beam 3 (5% scored), 2 threads: 169 ms as
        a leaf-major loop of `adc_scores` calls, 50 ms with a scan over a precomputed (nq, M, K)
        table, 16 ms fused (faiss IndexIVFPQ 10 ms; bench/results/tree_speed.md).
        """
        if backend not in BACKENDS:  # before the selector's pass over the ids
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_k(k)
        beam = _check_beam(beam)
        self._check_search_params(params, beam)
        D, I = self._search_positions(q, k, beam, backend, rows=self.pq._selected_rows(params))
        return D, self.pq._positions_to_ids(I)

    def _selected_lists(self, rows: np.ndarray | None):
        """(offsets, ids, leaf-ordered codes) of the inverted lists, or with `rows` (sorted
        positions) of the lists of those documents only: same leaves, same order within each."""
        offsets, ids, _ = self._inverted_lists()
        list_codes = self._list_codes()
        if rows is None:
            return offsets, ids, list_codes
        keep = np.zeros(self.ntotal, dtype=bool)
        keep[rows] = True
        in_list = keep[ids]
        kept_per_leaf = np.bincount(self.leaf_of[rows], minlength=self.n_leaves)
        return np.concatenate([[0], np.cumsum(kept_per_leaf)]).astype(np.int64), ids[in_list], list_codes[in_list]

    @staticmethod
    def _check_search_params(params, beam) -> None:
        """The IVF knobs of a faiss SearchParametersIVF this index cannot honour are refused, not
        ignored: nprobe is the `beam` argument here, and max_codes has no counterpart."""
        nprobe = getattr(params, "nprobe", None)
        if nprobe is not None and nprobe != beam:
            raise ValueError(f"params.nprobe={nprobe} but beam={beam}: TreeIndex probes `beam` leaves (faiss "
                             f"SearchParametersIVF's nprobe defaults to 1); pass SearchParameters(sel=...) or "
                             f"nprobe=beam")
        if getattr(params, "max_codes", 0):
            raise ValueError(f"params.max_codes={params.max_codes} is not supported by TreeIndex (use 0)")

    def _search_positions(self, q, k: int, beam: int, backend: str = "auto", rows: np.ndarray | None = None):
        """`search` with I as positions also in an index with ids (what the trainer, which
        addresses documents by row, searches with); `rows` (sorted positions) restricts it to
        those documents."""
        kind = array_kind(q=q)
        k = check_k(k)
        if backend not in BACKENDS:  # before the routing: ivf_search would say it only after it
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        on_device = searches_on_device(kind, backend)
        self.pq._require_trained()
        qt = self.transform_queries(self._vectors("q", q))
        leaves, score = self.probe(qt, beam, transformed=True)
        probes = np.where(np.isfinite(score), leaves, -1)
        offsets, ids, list_codes = self._selected_lists(rows)
        if on_device:
            if rows is None:
                codes_t, offsets_t, ids_t, centroids_t = self._device_lists(kind.device)
            else:
                codes_t, offsets_t, ids_t, centroids_t = (torch.from_numpy(np.ascontiguousarray(a)).to(kind.device)
                                                          for a in (list_codes, offsets, ids, self.pq.centroids))
            qr = torch.from_numpy(np.ascontiguousarray(self.pq.rotate(qt))).to(kind.device)
            return ivf_search(qr, centroids_t, codes_t, offsets_t, ids_t, torch.from_numpy(probes).to(kind.device), k,
                              metric=self.metric, backend="triton", check=False)
        D, I = ivf_search(self.pq.rotate(qt), self.pq.centroids, list_codes, offsets, ids, probes, k,
                          metric=self.metric, backend=backend,
                          check=False)  # validated queries, the index's own centroids and codes
        return kind.wrap(D), kind.wrap(I)

    def drop_device_copies(self) -> None:
        """Forget the device copies a device search keeps (the next one makes them again)."""
        self._device_cache = None

    def _device_lists(self, device: torch.device):
        """(leaf-ordered codes, list offsets, list ids, centroids) as torch tensors on `device`,
        cached until the leaves, the codes or the centroids change."""
        codes = self._list_codes()
        offsets, ids, _ = self._inverted_lists()
        key = (codes, offsets, ids, self.pq.centroids)
        cache = self._device_cache
        if cache is None or cache[0] != device or any(a is not b for a, b in zip(cache[1], key)):
            arrays = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in key)
            self._device_cache = (device, key, arrays)
        return self._device_cache[2]

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
        if self.pq.ids is not None:
            arrays["ids"] = self.pq.ids
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
                  "metric": self.metric, "opq": self.pq.opq, "init_scale": self.init_scale,
                  "doc_beam": self.doc_beam, "kmeans_metric": self.kmeans_metric,
                  "centroid_share": self.centroid_share}
        write_container(path, FORMAT_MAGIC, "jpq.TreeIndex", FORMAT_VERSION, params, self._arrays())

    @classmethod
    def load(cls, path) -> "TreeIndex":
        """Read a file written by `save`; a foreign, truncated or corrupted file raises ValueError."""
        header, arrays = read_container(path, FORMAT_MAGIC, "jpq.TreeIndex", FORMAT_VERSION, "jpq tree index",
                                        required=("d", "branching", "M", "nbits", "metric", "opq", "init_scale",
                                                  "doc_beam", "kmeans_metric"))
        try:
            index = cls(header["d"], tuple(header["branching"]), header["M"], header["nbits"], header["metric"],
                        header["opq"], header["init_scale"], header["doc_beam"], header["kmeans_metric"],
                        header.get("centroid_share", 0.0))  # files from before centroid_share: 0
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} has invalid parameters: {e}") from None
        if "codes" not in arrays or "leaf_of" not in arrays:
            raise ValueError(f"{path} has a corrupted array table: codes and leaf_of are required")
        index.pq.codes = arrays["codes"]
        index.pq.ids = arrays.get("ids")  # files from before ids: none
        index.pq.centroids = arrays.get("centroids")
        index.pq.rotation = arrays.get("rotation")
        index.query_matrix = arrays.get("query_matrix")
        index.leaf_of = arrays["leaf_of"]
        if "log_scales" in arrays:
            try:
                index.set_routing([arrays[f"embeddings.{l}"] for l in range(index.levels)],
                                  [arrays[f"biases.{l}"] for l in range(index.levels)], arrays["log_scales"])
            except KeyError as e:
                raise ValueError(f"{path}: routing array {e.args[0]!r} missing") from None
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        index._check_arrays(f"{path}: ")  # search trusts them: a wrong file must not read out of bounds
        return index

    def _check_arrays(self, where: str = "") -> None:
        """The PQ arrays (`PQIndex._check_arrays`), one leaf in [0, n_leaves) per code row, a
        (d, d) float32 query matrix and finite log-scales (`set_routing` checks the rest of the
        routing's shapes); ValueError naming the array."""
        self.pq._check_arrays(where)
        leaf_of = self.leaf_of
        if not isinstance(leaf_of, np.ndarray) or leaf_of.dtype != np.int64 or leaf_of.shape != (len(self.pq.codes),):
            raise ValueError(f"{where}leaf_of must be an int64 array of shape ({len(self.pq.codes)},) (one leaf per "
                             f"code row), got {getattr(leaf_of, 'dtype', type(leaf_of).__name__)} "
                             f"{getattr(leaf_of, 'shape', '')}")
        if leaf_of.size and (leaf_of.min() < 0 or leaf_of.max() >= self.n_leaves):
            raise ValueError(f"{where}leaf_of must hold leaves in [0, {self.n_leaves}), got values in "
                             f"[{leaf_of.min()}, {leaf_of.max()}]")
        qm = self.query_matrix
        if qm is not None and (not isinstance(qm, np.ndarray) or qm.dtype != np.float32 or qm.shape != (self.d, self.d)):
            raise ValueError(f"{where}query_matrix must be a float32 array of shape ({self.d}, {self.d}), got "
                             f"{getattr(qm, 'dtype', type(qm).__name__)} {getattr(qm, 'shape', '')}")
        if self.log_scales is not None and not np.isfinite(self.log_scales).all():
            raise ValueError(f"{where}log_scales must be finite, got {self.log_scales}")


def _check_share(share) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float, np.floating, np.integer)):
        raise TypeError(f"centroid_share must be a number in [0, 1), got {share!r}")
    if not 0.0 <= float(share) < 1.0:
        raise ValueError(f"centroid_share must be in [0, 1), got {share}")
    return float(share)


def _check_beam(beam) -> int:
    if isinstance(beam, bool) or not isinstance(beam, (int, np.integer)):
        raise TypeError(f"beam must be an int, got {type(beam).__name__}")
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    return int(beam)




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
    distill_weight: float = 1.0  # routing toward the leaves of the query's exact top neighbours
    distill_topk: int = 20  # T: neighbours per training query, exhaustive search under the current tower
    doc_weight: float = 1.0
    balance_weight: float = 1.0
    docs_per_step: int = 256  # random documents per step for the document and balance terms
    reassign_every: int = 2  # epochs between re-assignments of the documents to leaves
    # The trained index's search rule: the share of each query's leaves chosen by leaf centroid
    # instead of by the routing (TreeIndex.centroid_share). Training (hard negatives) and
    # validation (epoch selection) use the routing alone. Why: the routing alone sends queries whose
    # positives no training query pointed to into the wrong leaves more often than IVF does; the
    # leaf centroids of the learned partition cover them. Chosen on held-out training queries, the
    # test split never read: after training, share 0 / 0.25 / 0.5 gave Recall@100 at 5 / 10 / 20%
    # of 0.789 / 0.881 / 0.931, 0.841 / 0.883 / 0.942, 0.841 / 0.895 / 0.940 (4 seeds); with 0.5
    # on bench/tree_heldout.py's 6 seeds, 0.790 / 0.868 / 0.928 -> 0.828 / 0.881 / 0.933 and
    # nDCG@10 0.710 / 0.764 / 0.797 -> 0.734 / 0.771 / 0.801 (higher at 5% and 10% on 6/6 seeds).
    # Validating with the share too selected worse epochs (0.825 / 0.872 / 0.928).
    centroid_share: float = 0.5
    RESUME_FREE_FIELDS = ("centroid_share",)  # a resumed run may change it (Checkpointing._resume)
    val_fraction: float = 0.2
    holdout: str = "random"  # or "disjoint" (see jpq.train.holdout_split)
    val_fractions: tuple = TARGET_FRACTIONS  # validation: mean of (nDCG@10 + Recall@100) / 2 at these
    patience: int = 5
    # after selection on the held-out queries, train again from the k-means tree on all training
    # queries for the selected number of epochs (as jpq.train.TrainConfig.refit)
    refit: bool = True
    seed: int = 0
    # torch threads inside fit (restored after). The default tower's per-step tensors are tiny
    # (32 x 384): on the loaded 2-core dev box a 2-thread op cost ~8 ms of wake-up vs 0.1 ms on
    # one thread. None keeps torch's setting: use it for a full text encoder as the tower.
    threads: int | None = 1

    def __post_init__(self):
        self.val_fractions = tuple(float(f) for f in self.val_fractions)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        check_fields(self, ints={"epochs": 1, "batch_size": 1, "negatives": 1, "reassign_every": 1, "patience": 1,
                                 "distill_topk": 1, "docs_per_step": 1, "seed": 0},
                     non_negative=("lr_nodes", "lr_query", "lr_doc", "weight_decay", "retrieval_weight",
                                   "routing_weight", "distill_weight", "doc_weight", "balance_weight"),
                     positive=("scale",))
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        if self.holdout not in ("random", "disjoint"):
            raise ValueError(f"holdout must be 'random' or 'disjoint', got {self.holdout!r}")
        _check_share(self.centroid_share)
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


class TreeTrainer(Checkpointing):
    """Train the tree's routing jointly with the query tower (and optionally a document tower).

    Args:
        config: TreeConfig.
        index: a trained TreeIndex holding `doc_embeddings` (k-means tree + PQ codes); it is the
            epoch-0 model and is left unchanged (see `trained_index`).
        doc_embeddings: shape=(N, d) float32, the frozen document encoder's vectors, row = the
            index's position of the document (qrels name rows, also for an index with ids).
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
        check_holdout(self.train_ids, self.val_ids, config.val_fraction, config.holdout)
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
        self.teacher = {}  # refreshed at the start of every epoch (`_teacher`)

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
        idx.centroid_share = 0.0  # training and validation: the routing alone
        return idx

    @torch.no_grad()
    def _teacher(self, ids: list[str], chunk: int = 256) -> dict:
        """{query id: (rows (T,), weights (T,))}: the exact top-T documents of each training query
        under the *current* query tower (exhaustive search on the document vectors: the ranking a
        perfect router would keep), with softmax(scale * score) weights. Label-free, so it covers
        far more documents than the positives. Built from the current tower, not the frozen
        encoder, so that it follows the tower where the encoder's neighbourhoods are wrong (a
        teacher fixed at step 0 pulled routing to the wrong leaves on the synthetic test)."""
        T = min(self.cfg.distill_topk, len(self.X))
        out = {}
        for s in range(0, len(ids), chunk):
            part = ids[s : s + chunk]
            q = self._queries(part, grad=False)
            xd = self._doc_vectors().detach()
            sc = q @ xd.T if self.index0.metric == "ip" else -torch.cdist(q, xd) ** 2
            v, r = torch.topk(sc, T, dim=1)
            w = torch.softmax(self.cfg.scale * v, dim=1)
            for j, qid in enumerate(part):
                out[qid] = (r[j].numpy(), w[j].numpy())
        return out

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
            _, I = idx._search_positions(q, k, beam)
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
        # distillation: cross-entropy to the leaf distribution of the exact top-T neighbours
        distill = lq.new_zeros(())
        if cfg.distill_weight > 0:
            missing = [q for q in ids if q not in self.teacher]
            if missing:  # a step called outside fit
                self.teacher.update(self._teacher(missing))
            rows = np.stack([self.teacher[q][0] for q in ids])
            w = torch.from_numpy(np.stack([self.teacher[q][1] for q in ids])).to(lq.dtype)
            tgt = torch.zeros_like(lq).scatter_add_(1, torch.from_numpy(self.leaf_of[rows]), w)
            distill = -(tgt * lq).sum(1).mean()
        # documents stay in their leaves (sample + positives); balance over the sampled documents
        pos_rows = np.unique(np.concatenate([list(self.qrels[q]) for q in ids]))
        rows = torch.from_numpy(np.unique(np.concatenate([doc_sample, pos_rows])))
        ld = self.router(self._doc_vectors(rows, grad=True))
        doc = -ld.gather(1, torch.from_numpy(self.leaf_of)[rows].unsqueeze(1)).mean()
        mean_p = ld.exp().mean(0)
        balance = (mean_p * (mean_p.clamp_min(1e-12) * lq.shape[1]).log()).sum()  # KL(mean || uniform)
        loss = (cfg.retrieval_weight * retrieval + cfg.routing_weight * routing + cfg.distill_weight * distill
                + cfg.doc_weight * doc + cfg.balance_weight * balance)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "retrieval": float(retrieval.detach()),
                "routing": float(routing.detach()), "distill": float(distill.detach()), "doc": float(doc.detach()),
                "balance": float(balance.detach())}

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

    # ------------------------------------------------------------------ loop
    def _validate(self) -> tuple[float | None, dict]:
        """Selection score: the held-out queries' metric; None without held-out queries (then
        every epoch runs and the last one is kept)."""
        if not self.val_ids:
            return None, {}
        res = self.evaluate_ids(self.val_ids)
        return res["score"], {str(f): v for f, v in res.items() if f != "score"}

    def fit(self, resume: bool = False, stop_after_epoch: int | None = None) -> list:
        """Train, select the best epoch on the held-out queries, and load it.

        stop_after_epoch: stop (as if interrupted) once that many epochs are complete.
        Returns the history (one record per epoch; epoch 0 = the k-means tree).
        """
        with _torch_threads(self.cfg.threads):
            return self._fit(resume, stop_after_epoch)

    def _fit(self, resume: bool, stop_after_epoch: int | None) -> list:
        return self._run_epochs(resume, stop_after_epoch)

    def _initial_record(self) -> dict:
        score, detail = self._validate()
        return {"epoch": 0, "val": score, "val_detail": detail, "seconds": 0.0}

    def _train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(len(self.train_ids))
        batches = [[self.train_ids[i] for i in order[s : s + cfg.batch_size]]
                   for s in range(0, len(order), cfg.batch_size)]
        samples = [rng.choice(len(self.X), min(cfg.docs_per_step, len(self.X)), replace=False) for _ in batches]
        if cfg.distill_weight > 0:
            self.teacher = self._teacher(self.train_ids)
        self.query_tower.train()
        logs = []
        for ids, sample in tqdm(list(zip(batches, samples)), desc=f"tree epoch {epoch}",
                                disable=not self.progress, leave=False):
            idx = self._snapshot(with_queries=False)
            logs.append(self.step(ids, sample, idx))
        self.query_tower.eval()
        if epoch % cfg.reassign_every == 0:
            self._refresh_documents(self.pq, reassign=True, retrain_pq=True)
        score, detail = self._validate()
        return {"epoch": epoch, "val": score, "val_detail": detail,
                **{k: float(np.mean([l[k] for l in logs])) for k in logs[0]}}

    # ------------------------------------------------------------------ results
    def trained_index(self) -> TreeIndex:
        """A TreeIndex with the trained routing, the documents at their most probable leaves,
        (for a ResidualLinear tower) the query tower as `query_matrix`, and the configured
        `centroid_share` search rule."""
        idx = self._snapshot(with_queries=True, leaves=self._val_leaves())
        idx.pq = copy.deepcopy(self.pq)
        idx.leaf_of = idx.leaf_of.copy()
        idx.centroid_share = self.cfg.centroid_share
        return idx


# --------------------------------------------------------------------------- train + demo
def qrels_to_rows(dataset, split: str) -> dict:
    """{query_id: {doc_row: relevance}} for a BeirDataset split (positives only)."""
    rows = {}
    for qid, rel in dataset.qrels[split].items():
        pos = {d: r for d, r in rel.items() if r > 0}
        if pos:
            rows[qid] = dict(zip(dataset.doc_index(list(pos)).tolist(), pos.values()))
    return rows


def build_and_train_tree(doc_emb: np.ndarray, query_emb: dict, train_ids: list[str], qrels_rows: dict,
                         config: TreeConfig | None = None, branching: Sequence[int] | None = None,
                         M: int | None = None, metric: str = "ip", out_dir: str | Path | None = None,
                         resume: bool = True, progress: bool = True):
    """What `jpq train --index tree` runs: k-means tree over doc_emb (N, d) (branching and M by
    `default_branching` / `default_pq_m` unless given), then `TreeTrainer` on the training
    queries ({id: (d,) vector}, qrels by document row). Checkpoints in out_dir (resumed when
    `resume`). With config.refit, a second trainer retrains on all training queries for the
    selected number of epochs (checkpoints in out_dir/refit) and is the one returned.
    Returns (k-means tree, trained tree, trainer); `trainer.selected` is the selection run's
    trainer (its `state`: best_epoch, best_score, history), `trainer` itself without a refit."""
    config = config or TreeConfig()
    doc_emb = to_numpy_f32(doc_emb)
    N, d = doc_emb.shape
    init = TreeIndex(d, tuple(branching or default_branching(N)), M=M, metric=metric)
    init.train(doc_emb, seed=config.seed)
    init.add(doc_emb)

    def make(cfg: TreeConfig, out: Path | None) -> TreeTrainer:
        return TreeTrainer(cfg, init, doc_emb, train_ids, qrels_rows, query_embeddings=query_emb,
                           out_dir=out, progress=progress)

    trainer, selected = fit_and_refit(make, config, out_dir, resume=resume)
    trainer.selected = selected
    return init, trainer.trained_index(), trainer


def train_tree_cli(ws, out_dir, seed: int = 0, progress: bool = True, resume: bool = True,
                   config: TreeConfig | None = None) -> dict:
    """`jpq train --index tree`: train on the workspace's train split (a `jpq.pipeline.Workspace`:
    dataset, doc_emb, query_emb, train_split), checkpoints in out_dir (resumed when `resume` and
    the configuration matches), the trained index in out_dir/tree.jpq (its `query_matrix` holds
    the trained query tower, so it searches the frozen encoder's query vectors). Prints and
    returns a JSON summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or TreeConfig(seed=seed)
    train_ids = ws.dataset.split_query_ids(ws.train_split)
    q = to_numpy_f32(ws.query_emb)[ws.dataset.query_index(train_ids)]
    t0 = time.perf_counter()
    init, tree, trainer = build_and_train_tree(ws.doc_emb, dict(zip(train_ids, q)), train_ids,
                                               qrels_to_rows(ws.dataset, ws.train_split), config,
                                               out_dir=out_dir, resume=resume, progress=progress)
    tree.save(out_dir / "tree.jpq")
    summary = {"index": str(out_dir / "tree.jpq"), "branching": list(tree.branching), "M": tree.M,
               "seconds": round(time.perf_counter() - t0, 1), "selected_epochs": trainer.selected.state.best_epoch,
               "refit": trainer is not trainer.selected, "history": trainer.selected.state.history}
    print(json.dumps(summary, indent=1, default=float))
    return summary


def _ivf_fractions(index, q: np.ndarray, max_probe: int) -> np.ndarray:
    """Measured fraction scored of a faiss IVF index for nprobe = 1..max_probe, shape=(max_probe,)."""
    sizes = np.array([index.invlists.list_size(i) for i in range(index.nlist)])
    _, lists = index.quantizer.search(q, max_probe)
    return np.cumsum(sizes[lists], axis=1).mean(0) / index.ntotal


def run_tree_demo(dataset, doc_emb: np.ndarray, query_emb: np.ndarray, out_dir, seed: int = 0,
                  progress: bool = True, config: TreeConfig | None = None, fractions=TARGET_FRACTIONS,
                  train_split: str = "train", test_split: str | None = None, stem: str = "results",
                  checkpoint_dir: str | Path | None = "auto", curve_max_fraction: float = 0.3) -> list[dict]:
    """The tree demo on any BEIR dataset, with the same rules everywhere (no per-dataset tuning).

    Builds, on the same embeddings and with the same number of leaves / lists and the same PQ M:
    faiss IndexIVFFlat and IndexIVFPQ (k-means, inner product), the tree's k-means init
    ("tree-init") and the trained tree ("tree"), plus an ablation "ivf-flat+tower" (IVF-Flat
    searched with the trained query tower's vectors: how much of the gain is the tower, not the
    routing). Each is evaluated on `test_split` at the nprobe / beam whose fraction of documents
    scored, measured on the test queries, is closest to each target fraction. test_split None:
    "test", else "dev", else "validation" (as jpq.pipeline picks).

    dataset: a jpq.data.BeirDataset; doc_emb (N, d) / query_emb (nq, d) float32 aligned with
    dataset.corpus_ids / dataset.query_ids. Writes out_dir/{stem}.json (the list of records), {stem}-details.json (curves, settings),
    {stem}.md (table) and {stem}.png (quality vs fraction scored); checkpoints go to
    checkpoint_dir ("auto": out_dir/tree_train; None: none).
    Returns records {method, fraction_target, fraction_scored, leaves, knob, recall@100,
    ndcg@10, mrr@10}.
    """
    import faiss

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc_emb, query_emb = to_numpy_f32(doc_emb), to_numpy_f32(query_emb)
    if doc_emb.shape[0] != len(dataset.corpus_ids) or query_emb.shape[0] != len(dataset.query_ids):
        raise ValueError(f"embeddings {doc_emb.shape} / {query_emb.shape} do not match the dataset's "
                         f"{len(dataset.corpus_ids)} documents / {len(dataset.query_ids)} queries")
    config = config or TreeConfig(seed=seed)
    if test_split is None:
        test_split = next((s for s in ("test", "dev", "validation") if s in dataset.qrels), None)
        if test_split is None:
            raise ValueError(f"no test/dev/validation qrels split, found {sorted(dataset.qrels)}")
    N, d = doc_emb.shape
    train_ids = dataset.split_query_ids(train_split)
    q_train = query_emb[dataset.query_index(train_ids)]
    ckpt = out_dir / "tree_train" if checkpoint_dir == "auto" else checkpoint_dir
    t0 = time.perf_counter()
    init, tree, trainer = build_and_train_tree(
        doc_emb, dict(zip(train_ids, q_train)), train_ids, qrels_to_rows(dataset, train_split), config,
        out_dir=ckpt, progress=progress)
    train_seconds = time.perf_counter() - t0
    if ckpt is not None:
        tree.save(Path(ckpt) / "tree.jpq")

    test_ids = dataset.split_query_ids(test_split, evaluation=True)
    qt = query_emb[dataset.query_index(test_ids)]
    qrels = dataset.evaluation_qrels(test_split)
    leaves = init.n_leaves

    def per_query_metrics(I):
        return per_query((I, test_ids, dataset.corpus_ids), qrels, ("recall@100", "ndcg@10", "mrr@10"))

    # faiss baselines: same leaves, same PQ M, k-means on the same embeddings
    ivf_flat = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, leaves, faiss.METRIC_INNER_PRODUCT)
    ivf_pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, leaves, init.M, init.nbits, faiss.METRIC_INNER_PRODUCT)
    ivf_pq.pq.cp.min_points_per_centroid = 1  # 5k docs < 39 * 256: train anyway, without the warning
    ivf_pq.pq.cp.seed = seed
    for ix in (ivf_flat, ivf_pq):
        ix.cp.seed = seed
        ix.train(doc_emb)
        ix.add(doc_emb)
    q_tower = tree.transform_queries(qt)

    def ivf_runner(ix, q):
        fr = _ivf_fractions(ix, q, leaves)

        def run(p):
            ix.nprobe = p
            return ix.search(q, 100)[1]
        return fr, run

    def tree_runner(ix):
        fr = np.array([ix.fraction_scored(qt, b) for b in range(1, leaves + 1)])
        return fr, lambda b: ix.search(qt, 100, b)[1]

    init_searched = copy.deepcopy(init)  # the k-means tree searched as the trained one is
    init_searched.centroid_share = tree.centroid_share
    methods = {"tree": tree_runner(tree), "tree-init": tree_runner(init_searched),
               "ivf-flat": ivf_runner(ivf_flat, qt), "ivf-pq": ivf_runner(ivf_pq, qt),
               "ivf-flat+tower": ivf_runner(ivf_flat, q_tower)}
    # test queries whose positives were never training positives: what learned routing has not seen
    train_pos = {d for rel in dataset.qrels[train_split].values() for d, r in rel.items() if r > 0}
    unseen = [q for q in test_ids if not any(r > 0 and d in train_pos for d, r in qrels.get(q, {}).items())]
    records, curves, breakdown, chosen = [], {}, [], {}
    for name, (fr, run) in tqdm(methods.items(), desc="tree demo: evaluate", disable=not progress):
        cache = {}

        def at(knob):  # per-query metrics at this nprobe / beam
            if knob not in cache:
                cache[knob] = per_query_metrics(run(knob))
            return cache[knob]
        for f in fractions:
            knob = int(np.argmin(np.abs(fr - f))) + 1  # first (smallest) knob among equally close
            records.append({"method": name, "fraction_target": f, "fraction_scored": float(fr[knob - 1]),
                            "leaves": leaves, "knob": knob, **mean_over_queries(at(knob))})
            chosen[(name, f)] = at(knob)
            if unseen:
                breakdown.append({"method": name, "fraction_target": f, "queries": len(unseen),
                                  **mean_over_queries(at(knob), unseen, ("recall@100", "ndcg@10"))})
        knobs = [k + 1 for k in range(leaves) if fr[k] <= curve_max_fraction or k == 0]
        curves[name] = [{"knob": k, "fraction_scored": float(fr[k - 1]), **mean_over_queries(at(k))} for k in knobs]
    paired = _paired_bootstrap(chosen, fractions, ("ivf-flat", "ivf-pq", "tree-init"), seed=seed)
    exact = mean_over_queries(per_query_metrics(np.argsort(-(qt @ doc_emb.T), axis=1, kind="stable")[:, :100]))
    settings = {
        "dataset": dataset.name, "documents": N, "dim": d, "test_queries": len(test_ids),
        "branching": list(init.branching), "leaves": leaves, "M": init.M, "nbits": init.nbits,
        "train_queries": len(trainer.selected.train_ids), "val_queries": len(trainer.selected.val_ids),
        "refit": trainer is not trainer.selected,
        "best_epoch": trainer.selected.state.best_epoch, "epochs_run": trainer.selected.state.epoch,
        "train_seconds": round(train_seconds, 1), "config": asdict(config), "exact_flat": exact,
        "unseen_positive_queries": breakdown, "paired_bootstrap": paired,
        "history": trainer.selected.state.history,
    }
    atomic_write_json(out_dir / f"{stem}.json", records)  # a list of records, like the PQ demo
    atomic_write_json(out_dir / f"{stem}-details.json", {"curves": curves, "settings": settings})
    (out_dir / f"{stem}.md").write_text(_demo_markdown(records, settings))
    _demo_plot(curves, records, settings, out_dir / f"{stem}.png")
    return records




def _paired_bootstrap(chosen: dict, fractions, baselines, metrics=("recall@100", "ndcg@10"), seed: int = 0,
                      resamples: int = 2000) -> list[dict]:
    """Tree minus each baseline, per test query, at each target fraction: the mean difference and a
    95% percentile interval from `resamples` resamplings of the queries (paired: the same queries
    for both). chosen[(method, fraction)]: per-query metrics {metric: {query id: value}}."""
    rng = np.random.default_rng(seed)
    out = []
    for f in fractions:
        tree = chosen[("tree", f)]
        for base in baselines:
            other = chosen[(base, f)]
            for metric in metrics:
                out.append({"fraction_target": f, "versus": base, "metric": metric,
                            **paired_bootstrap(tree[metric], other[metric], resamples, rng)})
    return out


def _demo_markdown(records: list[dict], s: dict) -> str:
    lines = [
        f"# Learned tree vs IVF on {s['dataset']} ({s['test_queries']} test queries, {s['documents']} documents)",
        "",
        f"Tree {'x'.join(map(str, s['branching']))} = {s['leaves']} leaves (faiss: nlist = {s['leaves']}), "
        f"PQ M={s['M']} x {s['nbits']} bits in the tree and IVF-PQ. Trained on {s['train_queries']} train "
        f"queries, best epoch {s['best_epoch']} of {s['epochs_run']} selected on {s['val_queries']} held-out "
        f"train queries{', then refit on all ' + str(s['train_queries'] + s['val_queries']) + ' for that many epochs' if s.get('refit') else ''}; "
        f"training {s['train_seconds']} s. Exhaustive exact search: "
        f"Recall@100 {s['exact_flat']['recall@100']:.4f}, nDCG@10 {s['exact_flat']['ndcg@10']:.4f}.",
        "",
        "| target | method | fraction scored | knob (nprobe / beam) | Recall@100 | nDCG@10 | MRR@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["fraction_target"], r["method"])):
        lines.append(f"| {r['fraction_target']:.0%} | {r['method']} | {r['fraction_scored']:.4f} | {r['knob']} | "
                     f"{r['recall@100']:.4f} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} |")
    lines += ["", "`ivf-flat+tower` is an ablation: IVF-Flat (k-means lists, exact vectors) searched with the "
              "trained query tower's vectors, separating the tower's gain from the learned routing."]
    if s.get("unseen_positive_queries"):
        b = s["unseen_positive_queries"]
        lines += ["", f"Test queries none of whose relevant documents is a training positive ({b[0]['queries']} of "
                  f"{s['test_queries']}): what the learned routing never saw.", "",
                  "| target | method | Recall@100 | nDCG@10 |", "|---|---|---|---|"]
        for r in sorted(b, key=lambda r: (r["fraction_target"], r["method"])):
            lines.append(f"| {r['fraction_target']:.0%} | {r['method']} | {r['recall@100']:.4f} | {r['ndcg@10']:.4f} |")
    if s.get("paired_bootstrap"):
        p = s["paired_bootstrap"]
        lines += ["", f"Tree minus baseline, paired over the {p[0]['queries']} test queries (mean difference and 95% "
                  f"bootstrap interval, {p[0]['resamples']} resamplings): an interval that holds 0 is no measured difference.", "",
                  "| target | versus | Recall@100 | nDCG@10 |", "|---|---|---|---|"]
        by = {(r["fraction_target"], r["versus"], r["metric"]): r for r in p}
        cell = lambda r: f"{r['difference']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
        for f, v in sorted({(r["fraction_target"], r["versus"]) for r in p}):
            lines.append(f"| {f:.0%} | {v} | {cell(by[(f, v, 'recall@100')])} | {cell(by[(f, v, 'ndcg@10')])} |")
    return "\n".join(lines) + "\n"


def _demo_plot(curves: dict, records: list[dict], s: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("recall@100", "ndcg@10")):
        for name, pts in curves.items():
            ax.plot([p["fraction_scored"] for p in pts], [p[metric] for p in pts], marker=".",
                    linestyle="--" if name == "ivf-flat+tower" else "-", label=name)
        ax.axhline(s["exact_flat"][metric], color="gray", linewidth=0.8, linestyle=":", label="exhaustive exact")
        for f in sorted({r["fraction_target"] for r in records}):
            ax.axvline(f, color="lightgray", linewidth=0.8)
        ax.set_xlabel("fraction of documents scored")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{s['dataset']}: learned tree vs IVF, {s['leaves']} leaves, PQ M={s['M']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
