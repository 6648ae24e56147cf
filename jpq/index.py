"""`jpq.PQIndex`: a product-quantization index a faiss user recognises, on jpq's kernels.

    index = jpq.PQIndex(d=768, M=96, nbits=8, metric="ip")   # or opq=True
    index.train(xt); index.add(xb)
    D, I = index.search(xq, k)        # D (nq, k) float32, I (nq, k) int64, -1 padding
    index.save("docs.jpq"); index = jpq.PQIndex.load("docs.jpq")
    faiss_index = index.to_faiss(); jpq.PQIndex.from_faiss(faiss_index)

Codes are kept unpacked, one uint8 per sub-quantizer (also for nbits < 8), which is what the
ADC kernels read; `to_faiss` packs them into faiss' bit layout and `from_faiss` unpacks them.
"""
from __future__ import annotations

import logging
import math
import sys
import zlib

import numpy as np
import torch

from .kernels import adc_scores, adc_topk, assign, build_lut
from .kernels.assign import check_centroids
from .kernels.dispatch import BACKENDS, triton_importable
from .storage import read_container, write_container
from .kernels.arrays import (
    array_kind,
    check_codes,
    check_float_matrix,
    check_int,
    check_k,
    check_metric,
    to_numpy_codes,
    to_numpy_f32,
)

log = logging.getLogger(__name__)

FORMAT_MAGIC = b"JPQINDEX"
FORMAT_VERSION = 1


# Below this many multiply-adds NumPy's OpenBLAS computes a product on the calling thread (its
# small-matrix path) and `matmul_t` keeps NumPy, whose call costs less than torch's here.
SMALL_MATMUL = 1 << 20


def matmul_t(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T for float32 NumPy arrays: (n, d) x (e, d) -> (n, e) C-contiguous; by torch unless
    the product is small (n * d * e < SMALL_MATMUL).

    Why not NumPy throughout: above its small-matrix size, the bundled OpenBLAS keeps its own
    threads spinning for a while after each call, and they take the cores from the numba scan
    that follows (numba and torch share one OpenMP pool). On the 2-core dev CPU
    (`python bench/blas_contention.py` -> bench/results/blas_contention.md), an OPQ
    `PQIndex.search` (SciFact, M = 48, k = 100) with the rotation by NumPy took 21.0 / 8.1 /
    55.3 ms at 8 / 32 / 300 queries, by torch 1.3 / 2.9 / 25.4 ms (plain PQ, no rotation: 1.0 /
    2.5 / 23.5 ms); TreeIndex.search of 300 queries at beam 3 / 12, 46.8 / 50.3 ms with the
    leaf-centroid scores by NumPy, 6.7 / 10.9 ms by torch. Same search results either way; at
    1-4 queries (a product below SMALL_MATMUL) torch was up to 0.2 ms slower, so NumPy there."""
    n, d = x.shape
    if n * d * w.shape[0] < SMALL_MATMUL:
        return np.ascontiguousarray(x @ w.T, dtype=np.float32)
    x = np.require(x, np.float32, ["C", "W"])  # torch.from_numpy wants a writable array
    w = np.require(w, np.float32, ["C", "W"])
    return torch.from_numpy(x).matmul(torch.from_numpy(w).T).numpy()


# --------------------------------------------------------------------------- k-means
def train_pq_centroids(x: np.ndarray, M: int, K: int, niter: int = 25, seed: int = 1234,
                       init: np.ndarray | None = None) -> np.ndarray:
    """Lloyd k-means in every subspace at once, on the assign kernel.

    x: shape=(n, D) float32 with n >= K -> centroids shape=(M, K, D // M) float32.
    Initialisation: `init` (M, K, D // M) when given (warm start), else K distinct training
    points per subspace drawn with `seed`. An empty cluster
    is re-seeded with the point farthest from its centroid in the largest cluster (split),
    so every centroid ends up used when n >= K.
    """
    n, D = x.shape
    ds = D // M
    rng = np.random.default_rng(seed)
    xs = x.reshape(n, M, ds)
    if init is not None:
        C = np.array(init, dtype=np.float32)
    else:
        C = np.stack([xs[rng.choice(n, K, replace=False), m] for m in range(M)]).astype(np.float32)
    flat = torch.from_numpy(np.ascontiguousarray(xs.reshape(n * M, ds)))
    offsets = (np.arange(M, dtype=np.int64) * K)[None, :]
    for _ in range(niter):
        codes = assign(x, C)
        slot = torch.from_numpy((codes.astype(np.int64) + offsets).reshape(-1))
        sums = torch.zeros(M * K, ds, dtype=torch.float64).index_add_(0, slot, flat.double())
        counts = torch.bincount(slot, minlength=M * K).reshape(M, K).numpy()
        newC = (sums.numpy().reshape(M, K, ds) / np.maximum(counts, 1)[..., None]).astype(np.float32)
        newC[counts == 0] = C[counts == 0]
        for m, k in zip(*np.nonzero(counts == 0)):
            big = int(counts[m].argmax())  # split the largest cluster of this subspace
            members = np.nonzero(codes[:, m] == big)[0]
            far = members[((xs[members, m] - newC[m, big]) ** 2).sum(-1).argmax()]
            newC[m, k] = xs[far, m]
            counts[m, big] -= 1
            counts[m, k] = 1
        C = newC
    return C


def train_opq(x: np.ndarray, M: int, K: int, iterations: int = 20, pq_iterations: int = 4,
              pq_init_iterations: int = 20, seed: int = 1234):
    """Non-parametric OPQ (Ge et al., CVPR 2013), the alternation faiss' OPQMatrix runs:
    k-means in the rotated space, then the orthogonal Procrustes rotation that best maps the
    vectors onto their reconstructions. Written on the assign kernel because faiss' OPQMatrix
    took 25-145 s for 5k x 384 vectors, M=48, on the 2-core dev machine (this: about 6 s, with
    a slightly lower reconstruction error: 0.122 vs 0.127).

    x: shape=(n, d) float32 -> (rotation shape=(d, d) float32, with x_rot = x @ rotation.T;
    centroids shape=(M, K, d // M) float32 trained in the rotated space).
    """
    n, d = x.shape
    rng = np.random.default_rng(seed)
    R, _ = np.linalg.qr(rng.standard_normal((d, d)))  # random orthogonal start, as faiss
    R = R.astype(np.float32)
    C = train_pq_centroids(matmul_t(x, R), M, K, niter=pq_init_iterations, seed=seed)
    x64 = x.astype(np.float64)
    for _ in range(iterations):
        y = matmul_t(x, R)
        C = train_pq_centroids(y, M, K, niter=pq_iterations, seed=seed, init=C)
        codes = assign(y, C)
        y_hat = C[np.arange(M)[None, :], codes].reshape(n, d).astype(np.float64)
        # min over orthogonal W of ||x W - y_hat||: W = U V^T from svd(x^T y_hat); R = W^T
        U, _, Vt = np.linalg.svd(x64.T @ y_hat)
        R = (U @ Vt).T.astype(np.float32)
    y = matmul_t(x, R)
    C = train_pq_centroids(y, M, K, niter=pq_iterations, seed=seed, init=C)
    return R, C


# --------------------------------------------------------------------------- bit packing
def pack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """(n, M) uint8 codes -> (n, ceil(M * nbits / 8)) uint8, faiss' LSB-first bit layout."""
    n, M = codes.shape
    if nbits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    bits = (codes[:, :, None] >> np.arange(nbits, dtype=np.uint8)) & 1  # (n, M, nbits) LSB first
    return np.packbits(bits.reshape(n, M * nbits).astype(np.uint8), axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, M: int, nbits: int) -> np.ndarray:
    """Inverse of `pack_codes`."""
    if nbits == 8:
        return np.ascontiguousarray(packed[:, :M], dtype=np.uint8)
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : M * nbits].reshape(-1, M, nbits)
    return (bits << np.arange(nbits, dtype=np.uint8)).sum(-1).astype(np.uint8)


# --------------------------------------------------------------------------- unit-norm reconstructions
def unit_scale(norms):
    """1 / norms as float32 (NumPy or torch, as given), with 1 where a norm is 0 (a zero
    reconstruction scores 0 whatever its scale): the `doc_scale` of a unit_norm index."""
    if isinstance(norms, torch.Tensor):
        return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.ones_like(norms)).float()
    with np.errstate(divide="ignore"):
        return np.where(norms > 0, 1.0 / np.maximum(norms, 1e-30), 1.0).astype(np.float32)


def code_norms(centroids, codes, backend: str = "auto"):
    """(N,) float32 norms of the reconstructions of codes (N, M) under centroids (M, K, ds),
    NumPy or torch (on their device), no graph: one ADC scan (`adc_scores`) with the centroids'
    squared norms as the single query's table, so no (N, M) array is made."""
    sq = (centroids * centroids).sum(-1)[None]  # (1, M, K)
    norms2 = adc_scores(sq, codes, backend=backend)[0]
    return norms2.sqrt() if isinstance(norms2, torch.Tensor) else np.sqrt(norms2)


def unit_norm_scale(centroids, codes, backend: str = "auto"):
    """The doc_scale of a unit_norm search: 1 / ||x_hat|| of every code, NumPy or torch (on
    their device), no graph (`unit_scale` of `code_norms`)."""
    return unit_scale(code_norms(centroids, codes, backend=backend))


def reconstruction_norms_torch(centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(N,) norms of the reconstructions of codes (N, M) under centroids (M, K, ds), on their
    device; differentiable in the centroids (the JPQ trainer scores with them). Makes an (N, M)
    gather: for a batch's documents; whole-index norms without a graph use `adc_scores`."""
    M = centroids.shape[0]
    sq = (centroids * centroids).sum(-1)  # (M, K)
    return sq[torch.arange(M, device=centroids.device), codes.long()].sum(-1).sqrt()


# --------------------------------------------------------------------------- index
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _integer_vector(name: str, x, alternatives: str = "") -> np.ndarray:
    """x (a 1-d sequence of integers, NumPy or torch; empty of any dtype) as a NumPy array;
    TypeError naming `name` (and what else it may be) otherwise."""
    x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
    if x.ndim != 1 or x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or x.size == 0):
        raise TypeError(f"{name} must be a 1-d sequence of integers{alternatives}, got dtype {x.dtype}, "
                        f"shape {x.shape}")
    return x


def _check_radius(radius) -> float:
    """A range_search radius as a float: a number, or a 0-d array / tensor holding one; not nan.
    Past float32's range it becomes +-inf (the scores are float32, as in faiss)."""
    if isinstance(radius, (np.ndarray, torch.Tensor)) and radius.ndim == 0:
        radius = radius.item()
    if isinstance(radius, (bool, np.bool_)) or not isinstance(radius, (int, float, np.integer, np.floating)):
        raise TypeError(f"radius must be a number, got {type(radius).__name__}")
    radius = float(radius)
    if math.isnan(radius):
        raise ValueError("radius must not be nan")
    return math.copysign(math.inf, radius) if abs(radius) > FLOAT32_MAX else radius


class VectorIndexInput:
    """Input checks shared by the indexes (PQIndex, TreeIndex): needs `d` and `is_trained`."""

    def _vectors(self, name: str, x) -> np.ndarray:
        array_kind(**{name: x})
        check_float_matrix(name, x)
        if x.shape[1] != self.d:
            raise ValueError(f"{name} must have shape (n, {self.d}), got {tuple(x.shape)}")
        return to_numpy_f32(x)

    def _require_trained(self):
        if not self.is_trained:
            raise RuntimeError("the index is not trained: call train(x) or load a trained index first")


def searches_on_device(kind, backend: str) -> bool:
    """Whether an index search with queries of `kind` (`array_kind`) runs on their device: torch
    queries with backend "triton", or on a CUDA device with "auto" and Triton installed. The rule
    `PQIndex.search` and `TreeIndex.search` share."""
    on_cuda = kind.is_torch and kind.device.type == "cuda"
    return kind.is_torch and (backend == "triton" or (backend == "auto" and on_cuda and triton_importable()))


class PQIndex(VectorIndexInput):
    """Product-quantization index with ADC search.

    Args:
        d: vector dimension.
        M: number of sub-quantizers; d must be divisible by M.
        nbits: bits per sub-quantizer code, 1..8 (K = 2**nbits centroids each).
        metric: "ip" (inner product, larger is better) or "l2" (squared L2, smaller is better).
        opq: learn an OPQ rotation before PQ in `train` (`train_opq`; exported to faiss as an
            OPQMatrix inside an IndexPreTransform).
        unit_norm: the indexed vectors have unit norm (cosine embeddings, e.g. sentence-transformers
            models that normalise): every reconstruction is rescaled to unit norm, so `search`
            scores q . x_hat / ||x_hat|| and `decode` returns x_hat / ||x_hat||. The codes are the
            same and no byte is added (the norm is known, not stored: norm-explicit quantization
            with a constant norm); what changes is that a document whose reconstruction came out
            short (large quantization error) no longer loses score for it. Metric "ip" only;
            `to_faiss` refuses it (no faiss index rescales PQ reconstructions). On SciFact's
            MiniLM vectors, zero-shot train-split queries, OPQ at 32x / 64x / 96x: nDCG@10 +0.004
            to +0.026 over three seeds; after JPQ training no gain (`bench/unit_norm.py`).
    """

    # derived state rebuilt on demand (device copies, scales, id lookup): never pickled or copied
    _CACHES = ("_device_cache", "_device_scale_cache", "_device_ids_cache", "_unit_scale_cache", "_id_rows")

    def __getstate__(self) -> dict:
        """pickle / copy state without the caches: a pickled index holds no device tensor (it
        loads on a machine without the GPU it was searched on) and no stale lookup."""
        return {k: v for k, v in self.__dict__.items() if k not in self._CACHES}

    def __init__(self, d: int, M: int, nbits: int = 8, metric: str = "ip", opq: bool = False,
                 unit_norm: bool = False):
        for name, v in (("d", d), ("M", M), ("nbits", nbits)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if d < 1 or M < 1:
            raise ValueError(f"d and M must be >= 1, got d={d}, M={M}")
        if d % M:
            raise ValueError(f"d={d} is not divisible by M={M}")
        if not 1 <= nbits <= 8:
            raise ValueError(f"nbits must be in 1..8 (uint8 codes), got {nbits}")
        self.d, self.M, self.nbits = int(d), int(M), int(nbits)
        self.metric = check_metric(metric)
        self.opq = bool(opq)
        if not isinstance(unit_norm, (bool, np.bool_)):
            raise TypeError(f"unit_norm must be a bool, got {type(unit_norm).__name__}")
        if unit_norm and self.metric != "ip":
            raise ValueError(f"unit_norm rescales reconstructions for inner-product search: it needs "
                             f"metric 'ip', got {self.metric!r}")
        self.unit_norm = bool(unit_norm)
        self.centroids: np.ndarray | None = None  # (M, K, d // M) float32
        self.rotation: np.ndarray | None = None  # (d, d) float32; x_rot = x @ rotation.T
        self.codes = np.empty((0, self.M), np.uint8)  # (ntotal, M) uint8
        self.ids: np.ndarray | None = None  # (ntotal,) int64 once vectors are added with ids

    # ------------------------------------------------------------------ properties
    @property
    def K(self) -> int:
        return 1 << self.nbits

    @property
    def dsub(self) -> int:
        return self.d // self.M

    @property
    def ntotal(self) -> int:
        return int(self.codes.shape[0])

    @property
    def is_trained(self) -> bool:
        return self.centroids is not None

    @property
    def code_size(self) -> int:
        """Bytes per vector in faiss' packed layout."""
        return (self.M * self.nbits + 7) // 8

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return (f"PQIndex(d={self.d}, M={self.M}, nbits={self.nbits}, metric={self.metric!r}, "
                f"opq={self.opq}, {'unit_norm=True, ' if self.unit_norm else ''}ntotal={self.ntotal}"
                f"{', with ids' if self.ids is not None else ''})")

    # ------------------------------------------------------------------ helpers
    def rotate(self, x: np.ndarray) -> np.ndarray:
        """Apply the OPQ rotation (identity without OPQ). x: (n, d) float32."""
        return x if self.rotation is None else matmul_t(x, self.rotation)

    # ------------------------------------------------------------------ faiss-like API
    def train(self, x, niter: int = 25, seed: int = 1234, max_train_points: int | None = 65536,
              opq_iterations: int = 60):
        """Learn the (optional) OPQ rotation and the PQ centroids from x (n, d), n >= 2**nbits.

        niter: k-means iterations per subspace; opq_iterations: OPQ alternations (`train_opq`).
        60 (faiss' OPQMatrix runs 50): on SciFact's MiniLM vectors 20 alternations left the
        reconstruction error 8% / 3% above its converged value at 32x / 96x (60: within 1%
        of 150), and JPQ started from the converged rotation scored higher on held-out training
        queries on both splits tried (seeds 0 / 1: 32x 0.804 -> 0.808 / 0.820 -> 0.826, 96x
        0.764 -> 0.774 / 0.776 -> 0.785; selection runs, test never read).
        """
        x = self._vectors("x", x)
        niter, opq_iterations = check_int("niter", niter, 1), check_int("opq_iterations", opq_iterations, 1)
        seed = check_int("seed", seed)
        if x.shape[0] < self.K:
            raise ValueError(f"training needs at least K={self.K} vectors, got {x.shape[0]}")
        if max_train_points is not None and (isinstance(max_train_points, bool) or
                                             not isinstance(max_train_points, (int, np.integer)) or
                                             max_train_points < self.K):
            raise ValueError(f"max_train_points must be None or an int >= K={self.K}, got {max_train_points!r}")
        if max_train_points is not None and x.shape[0] > max_train_points:
            rng = np.random.default_rng(seed)
            x = x[np.sort(rng.choice(x.shape[0], max_train_points, replace=False))]
        if self.opq:
            self.rotation, init = train_opq(x, self.M, self.K, iterations=opq_iterations, seed=seed)
            self.centroids = train_pq_centroids(self.rotate(x), self.M, self.K, niter=niter, seed=seed,
                                                init=init)
        else:
            self.centroids = train_pq_centroids(x, self.M, self.K, niter=niter, seed=seed)
        return self

    def encode(self, x):
        """(n, d) float -> (n, M) uint8 codes (also `sa_encode`); torch in, torch out (on x's device;
        computed on the CPU)."""
        self._require_trained()
        kind = array_kind(x=x)
        return kind.wrap(self._encode_vectors(self._vectors("x", x)))

    def _encode_vectors(self, x: np.ndarray) -> np.ndarray:
        """Codes of checked float32 NumPy vectors."""
        return assign(self.rotate(x), self.centroids)

    sa_encode = encode

    def decode(self, codes):
        """(n, M) uint8 codes -> (n, d) float32 reconstructions in the original space (rescaled to
        unit norm with `unit_norm`: then search scores are q . decode(code)); torch in, torch out."""
        self._require_trained()
        kind = array_kind(codes=codes)
        codes = to_numpy_codes(check_codes(codes, self.M, self.K))
        x = self.centroids[np.arange(self.M)[None, :], codes].reshape(len(codes), self.d)
        if self.unit_norm:
            x = x * unit_scale(self.reconstruction_norms(codes))[:, None]
        return kind.wrap(x if self.rotation is None else matmul_t(x, self.rotation.T))

    def reconstruction_norms(self, codes=None) -> np.ndarray:
        """(n,) float32 norms ||x_hat|| of the plain reconstructions of `codes` (default: the
        index's own), from the centroids' squared norms (the rotation keeps norms)."""
        self._require_trained()
        if codes is None:
            codes = self.codes
        else:
            array_kind(codes=codes)
            codes = to_numpy_codes(check_codes(codes, self.M, self.K))
        return code_norms(self.centroids, codes, backend="cpu")

    sa_decode = decode

    def add(self, x):
        """Encode x (n, d) and append; ids continue from ntotal. A unit_norm index refuses
        vectors whose norm is not 1 (within 1e-3): it would score them as if it were."""
        self._require_trained()
        self._append(self._encode_vectors(self._checked_norms(self._vectors("x", x))), None, "add")

    def add_with_ids(self, x, ids):
        """Encode x (n, d) and append them under `ids` (n,) integers >= 0, which `search` then
        returns instead of positions (as faiss' IndexIDMap2 over an IndexPQ). An index holds
        vectors added with ids or without, not both; ids need not be unique or sorted (as in faiss)."""
        self._require_trained()
        x = self._checked_norms(self._vectors("x", x))
        self._append(self._encode_vectors(x), self._check_ids(ids, len(x)), "add_with_ids")

    def add_codes(self, codes, ids=None):
        """Append encoded vectors (n, M) (e.g. `encode`'s output), with `ids` (n,) as
        `add_with_ids` or without as `add`."""
        self._require_trained()
        array_kind(codes=codes)
        codes = to_numpy_codes(check_codes(codes, self.M, self.K))
        self._append(codes, None if ids is None else self._check_ids(ids, len(codes)), "add_codes")

    def _checked_norms(self, x: np.ndarray) -> np.ndarray:
        if self.unit_norm:
            norms = np.linalg.norm(x, axis=1)
            if len(x) and np.abs(norms - 1.0).max() > 1e-3:
                raise ValueError(f"this index has unit_norm=True, but x has norms in [{norms.min():.4g}, "
                                 f"{norms.max():.4g}]: normalise the vectors, or use unit_norm=False")
        return x

    @staticmethod
    def _check_ids(ids, n: int) -> np.ndarray:
        """A C-contiguous int64 NumPy copy of ids, shape (n,), every value >= 0 (-1 pads results)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids)
        if ids.dtype == np.bool_ or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.shape != (n,):
            raise ValueError(f"ids must have shape ({n},) (one per vector), got {ids.shape}")
        if np.issubdtype(ids.dtype, np.unsignedinteger) and ids.size and ids.max() > np.iinfo(np.int64).max:
            raise ValueError(f"ids must fit in int64, found {ids.max()}")
        ids = np.array(ids, dtype=np.int64, order="C", copy=True)  # the index's own: as faiss copies them
        if ids.size and ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks padding in search results), found {ids.min()}")
        return ids

    def _check_mix(self, with_ids: bool, how: str) -> None:
        """ValueError when adding vectors with ids (or without) would mix them with the held ones."""
        if self.ntotal and with_ids != (self.ids is not None):
            held = "with ids (add_with_ids)" if self.ids is not None else "without ids (add)"
            raise ValueError(f"this index holds {self.ntotal} vectors added {held}; {how} "
                             f"{'with' if with_ids else 'without'} ids would mix positions and ids: "
                             f"add them the same way (or reset() first)")

    def _append(self, codes: np.ndarray, ids: np.ndarray | None, how: str) -> None:
        self._check_mix(ids is not None, how)
        if not self.ntotal:
            self.ids = ids  # an emptied index takes either kind again
        elif ids is not None:
            self.ids = np.concatenate([self.ids, ids])
        self.codes = np.concatenate([self.codes, codes])

    def merge_from(self, other: "PQIndex", add_id: int = 0) -> None:
        """Move `other`'s vectors to the end of this index, as faiss' `merge_from`: `other` is
        emptied. Both must share d, M, nbits, metric, unit_norm and the same trained centroids
        and rotation (a ValueError names what differs; faiss merges codes of other codebooks
        silently). `add_id` is added to `other`'s ids (an index with ids); without ids it must
        be 0 and the moved vectors take the next positions."""
        if not isinstance(other, PQIndex):
            raise TypeError(f"other must be a PQIndex, got {type(other).__name__}")
        if other is self:
            raise ValueError("cannot merge an index into itself")
        add_id = check_int("add_id", add_id)
        if not INT64_MIN <= add_id <= INT64_MAX:
            raise ValueError(f"add_id must fit in int64, got {add_id}")
        for name in ("d", "M", "nbits", "metric", "opq", "unit_norm"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"cannot merge: {name} differs ({getattr(self, name)!r} here, "
                                 f"{getattr(other, name)!r} in other)")
        self._require_trained()
        other._require_trained()
        for name in ("centroids", "rotation"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if (mine is None) != (theirs is None) or (mine is not None and not np.array_equal(mine, theirs)):
                raise ValueError(f"cannot merge: the {name} differ (codes are only comparable under the "
                                 f"same trained quantizer)")
        if other.ids is None and add_id:
            raise ValueError(f"add_id must be 0 for vectors without ids (they take the next positions), got {add_id}")
        ids = None
        if other.ids is not None:
            if add_id and other.ntotal and not (INT64_MIN <= int(other.ids.max()) + add_id <= INT64_MAX
                                                 and int(other.ids.min()) + add_id >= 0):
                raise ValueError(f"add_id {add_id} takes other's ids out of [0, 2**63)")
            ids = other.ids + np.int64(add_id)
        if other.ntotal:
            self._append(other.codes, ids, "merge_from")
        other.reset()

    def reset(self):
        """Remove every vector (the trained quantizer stays), with the caches kept for them."""
        self.codes = np.empty((0, self.M), np.uint8)
        self.ids = None
        self.drop_device_copies()
        self._unit_scale_cache = None
        self._id_rows = None

    def remove_ids(self, ids) -> int:
        """Remove the vectors whose id is in `ids` (an index without ids: whose position is; the
        later positions then shift down, as in faiss); return how many were removed. `ids` is a
        1-d sequence of integers or a faiss `IDSelector` (`IDSelectorRange`, `IDSelectorBatch`,
        `IDSelectorNot`, ...), asked about each distinct id the index holds, as faiss asks it."""
        keep = self._rows_kept(ids)
        self._keep_rows(keep)
        return int(len(keep) - keep.sum())

    def _rows_kept(self, ids) -> np.ndarray:
        """Boolean mask over the rows: those `remove_ids(ids)` keeps."""
        keys = self.ids if self.ids is not None else np.arange(self.ntotal, dtype=np.int64)
        return ~self._selected(ids, keys)

    def _keep_rows(self, keep: np.ndarray) -> None:
        if not keep.all():
            self.codes = np.ascontiguousarray(self.codes[keep])
            if self.ids is not None:
                self.ids = np.ascontiguousarray(self.ids[keep])

    @staticmethod
    def _selected(ids, keys: np.ndarray) -> np.ndarray:
        """Boolean mask over `keys`: which of them `ids` (integers or a faiss IDSelector) selects."""
        faiss = sys.modules.get("faiss")  # a faiss IDSelector exists only once faiss is imported
        if faiss is not None and isinstance(ids, faiss.IDSelectorRange):  # the common selector, vectorised: imin <= id < imax
            return (keys >= ids.imin) & (keys < ids.imax)
        if faiss is not None and isinstance(ids, faiss.IDSelectorArray):  # a list faiss scans per id: isin
            return np.isin(keys, faiss.rev_swig_ptr(ids.ids, ids.n) if ids.n else np.zeros(0, np.int64))
        if faiss is not None and isinstance(ids, faiss.IDSelectorBitmap):  # bit i of byte i // 8, LSB first
            bitmap = faiss.rev_swig_ptr(ids.bitmap, ids.n) if ids.n else np.zeros(0, np.uint8)
            inside = (keys >= 0) & (keys < 8 * ids.n)
            member = np.zeros(len(keys), dtype=bool)
            k = keys[inside]
            member[inside] = (bitmap[k >> 3] >> (k & 7)) & 1 == 1
            return member
        if faiss is not None and isinstance(ids, faiss.IDSelector):
            # Any other selector, asked by faiss itself: a 1-d flat index holding each distinct key as an
            # id removes what the selector selects (faiss' own loop; 25x faster than is_member
            # from Python, about 25 ms per million distinct ids); the keys it keeps are the rest.
            unique, inverse = np.unique(keys, return_inverse=True)
            probe = faiss.IndexIDMap(faiss.IndexFlatL2(1))
            probe.add_with_ids(np.zeros((len(unique), 1), np.float32), unique)
            probe.remove_ids(ids)
            member = ~np.isin(unique, faiss.vector_to_array(probe.id_map), assume_unique=True)
            return member[inverse.reshape(-1)]
        remove = _integer_vector("ids", ids, " or a faiss IDSelector")
        if np.issubdtype(remove.dtype, np.unsignedinteger) and remove.size \
                and remove.max() > np.iinfo(np.int64).max:
            remove = remove[remove <= np.iinfo(np.int64).max]  # no id the index holds is that large
        return np.isin(keys, remove.astype(np.int64, copy=False))

    def _rows_of(self, keys: np.ndarray, what: str) -> np.ndarray:
        """Positions of the ids `keys` (int64, 1-d) (the last one added, as faiss' IndexIDMap2, for
        an id added twice); for an index without ids, the keys themselves. IndexError naming the
        first key the index does not hold."""
        if self.ids is None:
            bad = (keys < 0) | (keys >= self.ntotal)
            if bad.any():
                raise IndexError(f"{what} {int(keys[bad][0])} out of range [0, {self.ntotal})")
            return keys
        cache = getattr(self, "_id_rows", None)  # kept while `ids` is the same array (every change replaces it)
        if cache is None or cache[0] is not self.ids:
            order = np.argsort(self.ids, kind="stable")
            self._id_rows = cache = (self.ids, self.ids[order], order)
        _, sorted_ids, order = cache
        at = np.searchsorted(sorted_ids, keys, side="right") - 1  # stable order: the last of equal ids
        found = at >= 0
        found[found] = sorted_ids[at[found]] == keys[found]
        if not found.all():
            raise IndexError(f"{what} {int(keys[~found][0])} is not in the index")
        return order[at]

    def reconstruct(self, i: int) -> np.ndarray:
        """The reconstruction of id `i` (its position in an index without ids)."""
        i = check_int("i", i)
        if not INT64_MIN <= i <= INT64_MAX:  # no id the index holds (np.array would raise OverflowError)
            raise IndexError(f"id {i} is not in the index" if self.ids is not None
                             else f"id {i} out of range [0, {self.ntotal})")
        row = int(self._rows_of(np.array([i], np.int64), "id")[0])
        return self.decode(self.codes[row : row + 1])[0]

    def reconstruct_batch(self, keys) -> np.ndarray:
        """Reconstructions (n, d) of the ids `keys` (n,) (positions in an index without ids), as
        faiss' `reconstruct_batch`; IndexError for an id the index does not hold."""
        keys = _integer_vector("keys", keys)
        if np.issubdtype(keys.dtype, np.unsignedinteger) and keys.size and keys.max() > np.iinfo(np.int64).max:
            raise IndexError(f"id {int(keys.max())} is not in the index")
        return self.decode(self.codes[self._rows_of(keys.astype(np.int64), "id")])

    def reconstruct_n(self, i0: int = 0, n: int | None = None) -> np.ndarray:
        """Reconstructions of ids i0 .. i0 + n - 1, as faiss' `reconstruct_n`: for an index without
        ids, the vectors at those positions (n = None: to the end); for one with ids, the vectors
        added under those ids (n is then needed; IndexError for an id it does not hold)."""
        i0 = check_int("i0", i0)
        if self.ids is not None:
            if n is None:
                raise ValueError("an index with ids needs n: reconstruct_n(i0, n) reconstructs ids "
                                 "i0 .. i0 + n - 1 (reconstruct_batch takes any ids)")
            n = check_int("n", n)
            if n < 0:
                raise ValueError(f"n must be >= 0, got {n}")
            # ids are int64 >= 0, and n distinct ids need n vectors: refuse before building the range
            if n and (i0 < 0 or i0 + n - 1 > INT64_MAX or n > self.ntotal):
                raise IndexError(f"ids {i0} .. {i0 + n - 1} are not all in the index ({self.ntotal} vectors)")
            return self.reconstruct_batch(np.arange(i0, i0 + n, dtype=np.int64))
        n = self.ntotal - i0 if n is None else check_int("n", n)
        if i0 < 0 or n < 0 or i0 + n > self.ntotal:
            raise IndexError(f"range [{i0}, {i0 + n}) out of [0, {self.ntotal})")
        return self.decode(self.codes[i0 : i0 + n])

    def search_and_reconstruct(self, q, k: int, backend: str = "auto", params=None):
        """`search` (with `params` as there), plus the reconstructions R (nq, k, d) float32 of the
        vectors found, NaN rows where I is -1, as faiss' `search_and_reconstruct`. R is the
        vector each result was scored as (for a repeated id faiss reconstructs the id's last
        copy instead). torch queries give torch results (R on the queries' device)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_k(k)
        D, rows = self._search_positions(q, k, backend, rows=self._selected_rows(params))
        rows_np = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows
        R = np.full(rows_np.shape + (self.d,), np.nan, np.float32)
        found = rows_np >= 0
        R[found] = self.decode(self.codes[rows_np[found]])
        if isinstance(rows, torch.Tensor):
            R = torch.from_numpy(R).to(rows.device)
        return D, self._positions_to_ids(rows), R

    def assign(self, x, k: int = 1, backend: str = "auto", params=None):
        """The ids (positions) of the k best vectors for each row of x: `search`'s I, as faiss' `assign`."""
        return self.search(x, k, backend, params)[1]

    def lut(self, q, backend: str = "auto"):
        """Query look-up tables (nq, M, K) for q (nq, d), after the rotation."""
        self._require_trained()
        return build_lut(self.rotate(self._vectors("q", q)), self.centroids, self.metric, backend=backend)

    def search(self, q, k: int, backend: str = "auto", params=None):
        """k nearest codes by ADC. q: (nq, d) float32 NumPy or torch.

        Returns D (nq, k) float32 (inner products, or squared L2 distances) and I (nq, k) int64,
        best first, -1 ids (and -FLT_MAX / +FLT_MAX scores) past ntotal; torch in, torch out.
        I holds positions 0 .. ntotal - 1, or the ids of vectors added with `add_with_ids`.

        params: a faiss `SearchParameters` (or anything with a `sel` attribute) whose `sel`, a
        faiss IDSelector, restricts the search to the ids it selects, as faiss' flat and IVF
        indexes take it (faiss' IndexPQ refuses one). The selected codes are gathered, then
        scanned: a selector costs one pass over the ids per call (`remove_ids` says how fast),
        and fewer than k selected vectors pad with -1.

        Where it runs: torch queries on a CUDA device (backend "auto" with Triton installed, or
        "triton") are searched on that device: the rotation, the LUT GEMM and the Triton ADC
        top-k all run there, against a copy of the codes and centroids kept on the device (made
        on the first such call, and again whenever `codes`, `centroids` or `rotation` is replaced,
        as add / reset / train / load do; after editing one of them in place, call
        `drop_device_copies()`). Everything else runs on the CPU (backend "auto" / "cpu": the fast
        path; "reference": NumPy).
        """
        if backend not in BACKENDS:  # before the selector's pass over the ids
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_k(k)
        D, I = self._search_positions(q, k, backend, rows=self._selected_rows(params))
        return D, self._positions_to_ids(I)

    def _selected_rows(self, params) -> np.ndarray | None:
        """The sorted int64 positions `params.sel` selects; None for no selector (every row)."""
        if params is None:
            return None
        if not hasattr(params, "sel"):
            raise TypeError(f"params must be a faiss SearchParameters (with a sel attribute), got "
                            f"{type(params).__name__}")
        sel = params.sel
        if sel is None:
            return None
        faiss = sys.modules.get("faiss")
        if faiss is not None and type(sel) is faiss.IDSelector:
            # faiss hands `params.sel` back as a base-class IDSelector; the typed object it was set
            # from (an IDSelectorRange, ...: read as an array, `_selected`) is kept on params
            refs = list(getattr(params, "_sp_field_refs", {}).values()) + list(getattr(params, "referenced_objects", []))
            sel = next((r for r in refs if isinstance(r, faiss.IDSelector) and int(r.this) == int(sel.this)), sel)
        keys = self.ids if self.ids is not None else np.arange(self.ntotal, dtype=np.int64)
        return np.flatnonzero(self._selected(sel, keys)).astype(np.int64)

    def _positions_to_ids(self, I):
        """Search results' positions I (NumPy or torch, -1 padding kept) -> the ids they were added under."""
        if self.ids is None or not self.ntotal:  # nothing to map: every I is -1 padding
            return I
        if isinstance(I, torch.Tensor):
            ids = self._device_ids(I.device)
            return torch.where(I >= 0, ids[I.clamp(min=0)], I)
        return np.where(I >= 0, self.ids[np.maximum(I, 0)], I)

    # scores per range_search block: (queries x documents) floats, 64 MiB
    RANGE_BLOCK_SCORES = 1 << 24

    def range_search(self, q, radius: float, backend: str = "auto"):
        """Every indexed vector within `radius` of each query, as faiss' `range_search`: inner
        product > radius (metric "ip"), squared L2 distance < radius ("l2"), scored by ADC as
        `search` scores them.

        Returns lims (nq + 1,) int64, D (lims[-1],) float32 and I (lims[-1],) int64: query i's
        results are D[lims[i]:lims[i + 1]] and I[...], in index order (by position; an index
        with ids returns the ids), as faiss' IndexPQ lists them. torch queries give torch
        tensors; on a CUDA device (backend "auto" with Triton, or "triton") the scoring runs
        there. Memory: the results plus a few temporaries of at most RANGE_BLOCK_SCORES floats
        each: the look-up tables of a chunk of queries, one block of their scores, its mask.
        """
        kind = array_kind(q=q)
        radius = _check_radius(radius)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._require_trained()
        if searches_on_device(kind, backend):
            q, codes, centroids = self._rotated_device_queries(q)
            scale = self._device_unit_scale(codes, centroids, "triton") if self.unit_norm else None
            score_backend, xp = "triton", torch

            def luts(a: int, b: int):
                return build_lut(q[a:b].contiguous(), centroids, self.metric, backend="auto", check=False)
        else:
            q = self._vectors("q", q)
            codes, scale = self.codes, (self._unit_scale() if self.unit_norm else None)
            # "triton" with NumPy queries is refused by adc_scores, as search refuses it
            score_backend, xp = ("cpu" if backend == "auto" else backend), np

            def luts(a: int, b: int):
                return self.lut(q[a:b], backend="reference" if backend == "reference" else "cpu")
        nq, N = q.shape[0], codes.shape[0]
        queries_per_chunk = max(1, self.RANGE_BLOCK_SCORES // (self.M * self.K))
        found_q, found_n, found_d = [], [], []
        for qa in range(0, nq, queries_per_chunk):
            lut = luts(qa, qa + queries_per_chunk)
            block = max(1, self.RANGE_BLOCK_SCORES // lut.shape[0])
            for a in range(0, N, block):
                scores = adc_scores(lut, codes[a : a + block], backend=score_backend)
                if scale is not None:
                    scores = scores * scale[a : a + block][None]
                within = scores > radius if self.metric == "ip" else scores < radius
                # row-major: by query, then by document
                qi, ni = within.nonzero(as_tuple=True) if xp is torch else within.nonzero()
                found_q.append(qi + qa)
                found_n.append(ni + a)
                found_d.append(scores[qi, ni])
        if xp is torch:
            device = codes.device
            cat = (lambda parts, dtype: torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device))
            qi, ni, D = cat(found_q, torch.int64), cat(found_n, torch.int64), cat(found_d, torch.float32)
            order = torch.sort(qi, stable=True).indices  # blocks come in document order: stable keeps it
            I, D = ni[order], D[order]
            counts = torch.bincount(qi, minlength=nq)
            lims = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(counts, 0)])
            return lims, D, self._positions_to_ids(I)
        cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype))
        qi, ni, D = cat(found_q, np.int64), cat(found_n, np.int64), cat(found_d, np.float32)
        order = np.argsort(qi, kind="stable")
        I, D = ni[order], D[order]
        lims = np.concatenate([[0], np.cumsum(np.bincount(qi, minlength=nq))]).astype(np.int64)
        return tuple(kind.wrap(a) for a in (lims, D, self._positions_to_ids(I)))

    def _search_positions(self, q, k: int, backend: str = "auto", rows: np.ndarray | None = None):
        """`search` with I as positions 0 .. ntotal - 1 also in an index with ids (what the
        trainers, which address documents by row, search with); `rows` (sorted positions)
        restricts it to those rows."""
        kind = array_kind(q=q)
        k = check_k(k)
        if searches_on_device(kind, backend):
            return self._search_on_device(q, k, backend="triton", rows=rows)
        # the LUT is a small GEMM on the CPU; `backend` picks the scan path over the codes
        lut = self.lut(q, backend="reference" if backend == "reference" else "cpu")
        scale = self._unit_scale() if self.unit_norm else None
        codes = self.codes
        if rows is not None:
            codes, scale = codes[rows], (None if scale is None else scale[rows])
        D, I = adc_topk(lut, codes, k, metric=self.metric, backend=backend, check=False, doc_scale=scale)
        if rows is not None and len(rows):  # none selected: I is all -1 padding
            I = np.where(I >= 0, rows[np.maximum(I, 0)], I)
        return kind.wrap(D), kind.wrap(I)

    def _device_ids(self, device: torch.device) -> torch.Tensor:
        """The ids as an int64 tensor on `device`, kept while `ids` is the same array."""
        cache = getattr(self, "_device_ids_cache", None)
        if cache is None or cache[0] is not self.ids or cache[1] != device:
            self._device_ids_cache = (self.ids, device, torch.from_numpy(self.ids).to(device))
        return self._device_ids_cache[2]

    def _unit_scale(self) -> np.ndarray:
        """1 / ||x_hat|| of every indexed code (the doc_scale of a unit_norm search), kept between
        searches: computed again when `codes` or `centroids` is replaced or the centroids' values
        change (a checksum of them, cheap: they are small); in-place edits of `codes` are not seen
        (the codes of an index never change in place in jpq)."""
        arrays = (self.codes, self.centroids)  # held by the cache, so their ids cannot be reused
        stamp = (self.codes.shape, zlib.crc32(np.ascontiguousarray(self.centroids)))
        cache = getattr(self, "_unit_scale_cache", None)
        if cache is None or any(a is not b for a, b in zip(cache[0], arrays)) or cache[1] != stamp:
            self._unit_scale_cache = (arrays, stamp, unit_norm_scale(self.centroids, self.codes, backend="cpu"))
        return self._unit_scale_cache[2]

    def drop_device_copies(self) -> None:
        """Forget the device copies `search` keeps (frees their memory; the next device search
        copies the current arrays again)."""
        self._device_cache = None
        self._device_scale_cache = None
        self._device_ids_cache = None

    def _device_unit_scale(self, codes: torch.Tensor, centroids: torch.Tensor, backend: str) -> torch.Tensor:
        """`unit_norm_scale` of the device copies, kept while they are the same tensors (they are
        replaced whenever the index's arrays are, `_device_arrays`). Computing it per search was
        a pass over all codes: a one-query search on an H200 at N = 1M, M = 96 took 1.0-1.4 ms
        with it and 0.76 ms without (bench/results/gpu.md, runs 4-5)."""
        cache = getattr(self, "_device_scale_cache", None)
        if cache is None or cache[0] is not codes or cache[1] is not centroids:
            self._device_scale_cache = (codes, centroids, unit_norm_scale(centroids, codes, backend=backend))
        return self._device_scale_cache[2]

    def _device_arrays(self, device: torch.device):
        """(codes, centroids, rotation or None) as torch tensors on `device`, cached; the cache
        is rebuilt when any of the arrays is replaced (add, reset, load, training)."""
        key = (self.codes, self.centroids, self.rotation)
        cache = getattr(self, "_device_cache", None)
        if cache is None or cache[0] != device or any(a is not b for a, b in zip(cache[1], key)):
            check_centroids(self.centroids)  # finite: searches on the device skip that pass per call
            arrays = (
                torch.from_numpy(self.codes).to(device),
                torch.from_numpy(self.centroids).to(device),
                None if self.rotation is None else torch.from_numpy(self.rotation).to(device),
            )
            self._device_cache = (device, key, arrays)
        return self._device_cache[2]

    def _rotated_device_queries(self, q: torch.Tensor):
        """(q checked, float32 and rotated, codes, centroids): the device copies a device search
        of torch queries q reads, all on q's device."""
        check_float_matrix("q", q)
        if q.shape[1] != self.d:
            raise ValueError(f"q must have shape (n, {self.d}), got {tuple(q.shape)}")
        codes, centroids, rotation = self._device_arrays(q.device)
        q = q.detach().to(torch.float32)
        return (q if rotation is None else q @ rotation.T), codes, centroids

    def _search_on_device(self, q: torch.Tensor, k: int, backend: str, rows: np.ndarray | None = None):
        """`search` for torch queries, entirely on q's device (see `search`); `rows` (sorted
        positions) restricts it to those rows, gathered on the device."""
        self._require_trained()
        qd, codes, centroids = self._rotated_device_queries(q)
        # q was checked there, the centroids when copied to the device (`_device_arrays`)
        lut = build_lut(qd.contiguous(), centroids, self.metric, backend="auto", check=False)  # torch.bmm
        scale = self._device_unit_scale(codes, centroids, backend) if self.unit_norm else None
        if rows is None:
            return adc_topk(lut, codes, k, metric=self.metric, backend=backend, check=False, doc_scale=scale)
        rows_t = torch.from_numpy(rows).to(q.device)
        D, I = adc_topk(lut, codes.index_select(0, rows_t).contiguous(), k, metric=self.metric, backend=backend,
                        check=False, doc_scale=None if scale is None else scale.index_select(0, rows_t))
        return D, torch.where(I >= 0, rows_t[I.clamp(min=0)], I) if len(rows) else I

    # ------------------------------------------------------------------ persistence
    _ARRAY_NAMES = ("codes", "centroids", "rotation", "ids")  # what `_arrays` may hold, and `load` sets

    def _arrays(self) -> dict:
        arrays = {"codes": self.codes}
        if self.ids is not None:
            arrays["ids"] = self.ids
        if self.centroids is not None:
            arrays["centroids"] = self.centroids
        if self.rotation is not None:
            arrays["rotation"] = self.rotation
        return arrays

    def save(self, path):
        """Write a versioned, checksummed file atomically (temp file + rename in the same folder).

        Layout (`jpq.storage.write_container`): 8-byte magic, uint32 header length, JSON header
        (format version, parameters, array table, sha256 of the payload), the raw arrays.
        """
        params = {"d": self.d, "M": self.M, "nbits": self.nbits, "metric": self.metric, "opq": self.opq,
                  "unit_norm": self.unit_norm}
        write_container(path, FORMAT_MAGIC, "jpq.PQIndex", FORMAT_VERSION, params, self._arrays())

    @classmethod
    def load(cls, path) -> "PQIndex":
        """Read a file written by `save`; a foreign, truncated or corrupted file raises ValueError."""
        header, arrays = read_container(path, FORMAT_MAGIC, "jpq.PQIndex", FORMAT_VERSION, "jpq index",
                                        required=("d", "M", "nbits", "metric", "opq"))
        try:
            index = cls(header["d"], header["M"], header["nbits"], header["metric"], header["opq"],
                        unit_norm=header.get("unit_norm", False))  # files from before it have plain reconstructions
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} has invalid parameters: {e}") from None
        unknown = sorted(set(arrays) - set(cls._ARRAY_NAMES))
        if unknown:
            raise ValueError(f"{path} has arrays a jpq index does not have: {unknown}")
        for name, a in arrays.items():
            setattr(index, name, a)
        index._check_arrays(f"{path}: ")  # search trusts them: a wrong file must not read out of bounds
        return index

    def _check_arrays(self, where: str = "") -> None:
        """Shapes, dtypes and code range of the stored arrays against (d, M, K), as `search`
        assumes them (it skips the per-call pass over the codes); ValueError naming the array."""
        shapes = {"centroids": (self.M, self.K, self.d // self.M), "rotation": (self.d, self.d)}
        for name, shape in shapes.items():
            a = getattr(self, name)
            if a is not None and (not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shape):
                raise ValueError(f"{where}{name} must be a float32 array of shape {shape}, got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        if self.codes.dtype != np.uint8 or self.codes.ndim != 2:
            raise ValueError(f"{where}codes must be a uint8 array (N, {self.M}), got {self.codes.dtype} "
                             f"{self.codes.shape}")
        check_codes(self.codes, self.M, self.K, name=f"{where}codes")
        if self.ids is not None:
            if not isinstance(self.ids, np.ndarray) or self.ids.dtype != np.int64 or self.ids.shape != (self.ntotal,):
                raise ValueError(f"{where}ids must be an int64 array of shape ({self.ntotal},) (one per code), got "
                                 f"{getattr(self.ids, 'dtype', type(self.ids).__name__)} {getattr(self.ids, 'shape', '')}")
            if self.ntotal and self.ids.min() < 0:
                raise ValueError(f"{where}ids must be >= 0, found {self.ids.min()}")

    # ------------------------------------------------------------------ faiss interop
    def to_faiss(self):
        """A faiss IndexPQ (or IndexPreTransform(OPQMatrix, IndexPQ)) with the same centroids and
        codes, so faiss' search gives the same results; inside an IndexIDMap2 when the index has ids."""
        import faiss

        self._require_trained()
        if self.unit_norm:
            raise ValueError("this index has unit_norm=True (reconstructions rescaled to unit norm), which no faiss "
                             "index computes from PQ codes; export a copy with unit_norm = False to get faiss' plain "
                             "inner products over the same codes (other scores and rankings)")
        fmetric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        pq_index = faiss.IndexPQ(self.d, self.M, self.nbits, fmetric)
        faiss.copy_array_to_vector(self.centroids.ravel(), pq_index.pq.centroids)
        pq_index.is_trained = True
        if self.ntotal:
            packed = pack_codes(self.codes, self.nbits)
            faiss.copy_array_to_vector(packed.ravel(), pq_index.codes)
            pq_index.ntotal = self.ntotal
        if self.rotation is None:
            return self._faiss_with_ids(pq_index)
        opq = faiss.OPQMatrix(self.d, self.M)
        faiss.copy_array_to_vector(self.rotation.ravel(), opq.A)
        opq.is_trained = True
        # the rotation is orthonormal (train_opq, from_faiss check it): without the flag faiss refuses
        # reverse_transform, so the exported index could search but not reconstruct or sa_decode
        opq.is_orthonormal = True
        out = faiss.IndexPreTransform(opq, pq_index)
        out.is_trained = True
        out.ntotal = self.ntotal  # faiss' Python wrapper keeps opq and pq_index alive
        return self._faiss_with_ids(out)

    def _faiss_with_ids(self, index):
        """`index` inside a faiss IndexIDMap2 holding the ids (index itself without ids)."""
        import faiss

        if self.ids is None:
            return index
        n, index.ntotal = index.ntotal, 0  # faiss wraps only an empty index: its codes are filled already
        out = faiss.IndexIDMap2(index)  # the wrapper keeps a reference to index
        index.ntotal = n
        if self.ntotal:
            faiss.copy_array_to_vector(self.ids, out.id_map)
        out.ntotal = self.ntotal
        out.construct_rev_map()
        return out

    @classmethod
    def from_faiss(cls, index) -> "PQIndex":
        """Build from a faiss IndexPQ, or an IndexPreTransform of one linear transform + IndexPQ,
        either optionally inside an IndexIDMap / IndexIDMap2 (whose ids it keeps)."""
        import faiss

        # the wrappers own the indexes inside them: keep each alive (`given`, `pretransform`) while its
        # inner index is read, or a temporary (`from_faiss(faiss.read_index(path))`) is freed under us
        given, ids = index, None
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            ids = faiss.vector_to_array(index.id_map).astype(np.int64)
            index = faiss.downcast_index(index.index)
        pretransform, rotation = index, None
        if isinstance(index, faiss.IndexPreTransform):
            if index.chain.size() != 1:
                raise ValueError(f"expected one transform before the PQ, got {index.chain.size()}")
            vt = faiss.downcast_VectorTransform(index.chain.at(0))
            if not isinstance(vt, faiss.LinearTransform) or vt.d_in != vt.d_out:
                raise ValueError(f"unsupported transform {type(vt).__name__}: need a square linear one")
            if vt.have_bias:
                raise ValueError("linear transforms with a bias are not supported")
            if not vt.is_trained:
                raise ValueError(f"the index's {type(vt).__name__} is not trained: train the faiss index first")
            rotation = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in).astype(np.float32)
            # decode inverts the rotation by its transpose: only right for an orthonormal matrix
            err = float(np.abs(rotation.astype(np.float64) @ rotation.T - np.eye(vt.d_in)).max())
            if err > 1e-3:
                raise ValueError(f"the linear transform is not orthonormal (max |A A^T - I| = {err:.2g}): "
                                 "jpq supports rotations (OPQ) only")
            index = faiss.downcast_index(index.index)
        if not isinstance(index, faiss.IndexPQ):
            raise TypeError(f"expected a faiss IndexPQ (optionally inside IndexPreTransform), got "
                            f"{type(index).__name__}")
        if index.metric_type == faiss.METRIC_INNER_PRODUCT:
            metric = "ip"
        elif index.metric_type == faiss.METRIC_L2:
            metric = "l2"
        else:
            raise ValueError(f"unsupported faiss metric type {index.metric_type}")
        pq = index.pq
        if pq.nbits > 8:
            raise ValueError(f"faiss index has nbits={pq.nbits}; jpq supports up to 8")
        out = cls(index.d, pq.M, pq.nbits, metric, opq=rotation is not None)
        out.rotation = rotation
        if index.is_trained:
            out.centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub).copy()
        if index.ntotal:
            packed = faiss.vector_to_array(index.codes).reshape(index.ntotal, pq.code_size)
            out.codes = unpack_codes(packed, pq.M, pq.nbits)
        if ids is not None:
            out.ids = ids
            out._check_arrays("the faiss IndexIDMap: ")  # one id per code, none negative
        del given, pretransform  # everything is copied out: the wrappers (and what they own) may go
        return out


# --------------------------------------------------------------------------- query-aware codebooks
def query_aware_codebooks(index: PQIndex, x, queries, shrinkage: float = 0.3, niter: int = 25,
                          seed: int = 1234, max_train_points: int | None = 65536) -> PQIndex:
    """A copy of a trained inner-product `index` whose codebooks and codes are fitted to the
    errors that *queries* see, holding the codes of x (ids 0..n-1).

    A PQ index scores q . x_hat, so what matters is E_q[(q . (x - x_hat))^2] = e^T S e with S the
    second moment of the queries, not ||e||^2 (what plain k-means minimises). S is estimated from
    `queries` (e.g. the training queries' embeddings: label-free), shrunk towards the identity,

        S' = (1 - shrinkage) * S * d / trace(S) + shrinkage * I,

    and kept block-diagonal over the sub-quantizers (in the OPQ-rotated space), so the problem
    stays separable: with S'_m = L_m L_m^T (Cholesky), k-means on the whitened sub-vectors
    x_m L_m (warm-started from index's centroids) minimises sum_m e_m^T S'_m e_m, and the
    centroids map back as C_m = Cw_m L_m^{-1}. shrinkage=1 is plain k-means (a refinement of
    index's codebooks); smaller values trust the query distribution more.

    The codes of x are the whitened nearest centroids. Vectors `add`ed to the returned index
    later are encoded by plain nearest centroid (as any PQIndex does), so build the index from
    all documents here. An optional JPQ initialisation (`TrainConfig.query_aware_init`): on
    SciFact (MiniLM, 96x, shrinkage 0.3, S from the 647 kept training queries) the held-out
    training queries' nDCG@10 before training went 0.528 -> 0.540; after training the gain
    depended on the setting (JPQ at centroid rate 1e-4 0.754 -> 0.764, at 1e-3 0.764 -> 0.760;
    centroids-only none): bench/results/query_aware_init.md.

    x: shape=(n, d); queries: shape=(nq, d), nq >= 1 (NumPy or torch, float32). Returns a new
    PQIndex (index is unchanged).
    """
    if not isinstance(index, PQIndex):
        raise TypeError(f"index must be a PQIndex, got {type(index).__name__}")
    index._require_trained()
    if index.metric != "ip":
        raise ValueError(f"query-aware codebooks need an inner-product index (metric 'ip'), got {index.metric!r}")
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be a number in (0, 1], got {shrinkage!r}")
    x = index._vectors("x", x)
    q = index._vectors("queries", queries)
    if len(q) == 0:
        raise ValueError("queries must hold at least one vector")
    if len(x) < index.K:
        raise ValueError(f"x needs at least K={index.K} vectors, got {len(x)}")
    d, M, K, ds = index.d, index.M, index.K, index.dsub
    S = np.zeros((d, d))
    for s in range(0, len(q), 65536):
        qr = index.rotate(q[s : s + 65536]).astype(np.float64)
        S += qr.T @ qr
    S /= len(q)
    tr = float(np.trace(S))
    S = (1.0 - shrinkage) * S * (d / tr) + shrinkage * np.eye(d) if tr > 0 else np.eye(d)
    L = np.stack([np.linalg.cholesky(S[m * ds : (m + 1) * ds, m * ds : (m + 1) * ds]) for m in range(M)])

    xw = np.empty_like(x)  # whitened rotated vectors, float64 per chunk: no float64 copy of a large corpus
    for s in range(0, len(x), 65536):
        part = index.rotate(x[s : s + 65536]).astype(np.float64)
        xw[s : s + len(part)] = np.einsum("nmi,mij->nmj", part.reshape(len(part), M, ds), L).reshape(len(part), d)
    xt = xw
    if max_train_points is not None and len(xw) > max_train_points:
        xt = xw[np.sort(np.random.default_rng(seed).choice(len(xw), max_train_points, replace=False))]
    init = np.einsum("mki,mij->mkj", index.centroids.astype(np.float64), L).astype(np.float32)
    Cw = train_pq_centroids(xt, M, K, niter=niter, seed=seed, init=init)
    # C_m = Cw_m L_m^{-1}, i.e. solve L_m^T C_m^T = Cw_m^T
    C = np.stack([np.linalg.solve(L[m].T, Cw[m].astype(np.float64).T).T for m in range(M)])
    out = PQIndex(d, M, nbits=index.nbits, metric=index.metric, opq=index.opq, unit_norm=index.unit_norm)
    out.rotation = None if index.rotation is None else index.rotation.copy()
    out.centroids = np.ascontiguousarray(C, dtype=np.float32)
    out.reset()
    out.add_codes(assign(xw, Cw))
    return out


# --------------------------------------------------------------------------- anisotropic PQ
def check_eta(eta, name: str = "eta") -> float:
    """The anisotropic weight as a float: a finite number >= 1 (1 = plain squared error)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 1.0:
        raise ValueError(f"{name} must be a finite number >= 1 (1 = the plain squared error), got {eta!r}")
    return float(eta)


def _inverse_norms(y: torch.Tensor) -> torch.Tensor:
    """1 / ||y_i|| per row, 0 for zero rows (their loss is the plain squared error)."""
    norm = y.norm(dim=1)
    return torch.where(norm > 0, 1.0 / norm.clamp_min(1e-300), torch.zeros_like(norm))


def _anisotropic_sweep_codes(y, u_scale, C, codes, eta, sweeps):
    """Coordinate descent over the sub-quantizers for the codes of rotated vectors y (n, d)
    float64 under the anisotropic loss (see `anisotropic_codebooks`). u_scale = 1 / ||y|| (0 for
    zero vectors). codes (n, M) int64 are updated in place; returns the residual projection
    s = (y - y_hat) . u per vector."""
    n, d = y.shape
    M, K, ds = C.shape
    ym = y.view(n, M, ds)
    cn = C.pow(2).sum(-1)  # (M, K)
    ar = torch.arange(M)
    s = ((y - C[ar, codes].reshape(n, d)) * y).sum(1) * u_scale
    for _ in range(sweeps):
        for m in range(M):
            G = ym[:, m] @ C[m].T  # (n, K): y_m . c_k
            cur = C[m, codes[:, m]]
            a = s + (ym[:, m] * cur).sum(1) * u_scale  # (y - y_hat without sub-quantizer m) . u
            # ||y_m - c_k||^2 - ||y_m||^2 + (eta - 1) (a - u_m . c_k)^2
            loss = cn[m][None, :] - 2.0 * G + (eta - 1.0) * (a[:, None] - G * u_scale[:, None]).pow(2)
            codes[:, m] = loss.argmin(1)
            s = a - (ym[:, m] * C[m, codes[:, m]]).sum(1) * u_scale
    return s


def _anisotropic_update_codebooks(y, u, C, codes, s, eta):
    """Exact least-squares update of every sub-quantizer's codewords in turn (the others held)
    under the anisotropic loss, codes fixed; C (M, K, ds) float64 is updated in place. s is the
    residual projection (y - y_hat) . u from `_anisotropic_sweep_codes`. For codeword k of
    sub-quantizer m with members i the normal equations are

        (n_k I + (eta - 1) sum_i u_im u_im^T) c = sum_i y_im + (eta - 1) sum_i b_i u_im,

    b_i = (y_i - y_hat_i without sub-quantizer m) . u_i. An unused codeword keeps its place."""
    n = len(y)
    M, K, ds = C.shape
    ym, um = y.view(n, M, ds), u.view(n, M, ds)
    eye = torch.eye(ds, dtype=torch.float64)
    for m in range(M):
        k = codes[:, m]
        b = s + (um[:, m] * C[m, k]).sum(1)
        A = torch.zeros(K, ds, ds, dtype=torch.float64)
        A.index_add_(0, k, (eta - 1.0) * um[:, m, :, None] * um[:, m, None, :])
        count = torch.bincount(k, minlength=K).double()
        A += count[:, None, None] * eye
        rhs = torch.zeros(K, ds, dtype=torch.float64).index_add_(0, k, ym[:, m] + (eta - 1.0) * b[:, None] * um[:, m])
        used = count > 0
        C[m, used] = torch.linalg.solve(A[used], rhs[used])
        s = b - (um[:, m] * C[m, k]).sum(1)
    return s


def anisotropic_loss(index: "PQIndex", x, eta: float, codes=None) -> float:
    """Mean anisotropic reconstruction loss ||r||^2 + (eta - 1) (r . x / ||x||)^2, r = x - x_hat,
    of vectors x under index's rotation and centroids (codes: index.codes by default)."""
    index._require_trained()
    y = torch.from_numpy(index.rotate(index._vectors("x", x))).double()
    codes = index.codes if codes is None else codes
    y_hat = torch.from_numpy(index.centroids[np.arange(index.M)[None, :], codes].reshape(len(y), index.d)).double()
    u = y * _inverse_norms(y)[:, None]
    r = y - y_hat
    return float((r.pow(2).sum(1) + (eta - 1.0) * (r * u).sum(1).pow(2)).mean()) if len(y) else 0.0


def anisotropic_codebooks(index: "PQIndex", x, eta: float = 4.0, iterations: int = 10, sweeps: int = 3,
                          seed: int = 1234, max_train_points: int | None = 65536,
                          chunk: int = 65536) -> "PQIndex":
    """A copy of a trained inner-product `index` whose codebooks and codes minimise the
    anisotropic ("score-aware") loss of Guo et al. (ICML 2020, the loss of ScaNN) instead of the
    plain reconstruction error, holding the codes of x (ids 0..n-1).

    With r = x - x_hat and u = x / ||x|| (in the index's rotated space) the loss is

        ||r||^2 + (eta - 1) * (r . u)^2,

    i.e. the error parallel to the vector weighs eta times the orthogonal error. For a query q
    the score error q . r has a parallel part (q . u)(r . u), large for exactly the documents
    that rank high for q, and an orthogonal part spread over d - 1 directions; eta = 1 is plain
    k-means. Starting from index's codes and centroids, it alternates `sweeps` rounds of
    coordinate descent over the sub-quantizers for the codes with an exact least-squares update
    of each sub-quantizer's codewords given the others (a K x (d/M)^2 linear solve per
    sub-quantizer), `iterations` times; no step increases the loss. The codebooks are fitted on
    at most `max_train_points` vectors of x (drawn with `seed`), then all of x is encoded.

    On SciFact with MiniLM (OPQ, zero-shot train-split queries, nDCG@10 against exact 0.660):
    96x (M = 16) 0.534 -> 0.561 at eta = 4; 32x (M = 48) 0.635 -> 0.637
    (`python bench/anisotropic_init.py`). An optional initialisation of JPQ training
    (`TrainConfig.anisotropic_eta`, off by default: see there).

    Vectors `add`ed to the returned index later are encoded by plain nearest centroid, as any
    PQIndex (and faiss) does: build the index from all documents here.

    x: shape=(n, d) float32 (NumPy or torch), n >= K. Returns a new PQIndex (index unchanged).
    """
    if not isinstance(index, PQIndex):
        raise TypeError(f"index must be a PQIndex, got {type(index).__name__}")
    index._require_trained()
    if index.metric != "ip":
        raise ValueError(f"anisotropic codebooks need an inner-product index (metric 'ip'), got {index.metric!r}")
    eta = check_eta(eta)
    for name, v, low in (("iterations", iterations, 0), ("sweeps", sweeps, 1), ("chunk", chunk, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    x = index._vectors("x", x)
    if len(x) < index.K:
        raise ValueError(f"x needs at least K={index.K} vectors, got {len(x)}")
    d, M = index.d, index.M
    C = torch.from_numpy(index.centroids).double().clone()
    train_rows = np.arange(len(x))
    if max_train_points is not None and len(x) > max_train_points:
        train_rows = np.sort(np.random.default_rng(seed).choice(len(x), max_train_points, replace=False))
    y_train = index.rotate(x[train_rows])
    y = torch.from_numpy(y_train).double()
    codes = torch.from_numpy(assign(y_train, index.centroids).astype(np.int64))
    del y_train
    u_scale = _inverse_norms(y)
    u = y * u_scale[:, None]
    for _ in range(iterations):
        s = _anisotropic_sweep_codes(y, u_scale, C, codes, eta, sweeps)
        _anisotropic_update_codebooks(y, u, C, codes, s, eta)
    del y, u
    whole = len(train_rows) == len(x)
    out = PQIndex(d, M, nbits=index.nbits, metric=index.metric, opq=index.opq, unit_norm=index.unit_norm)
    out.rotation = None if index.rotation is None else index.rotation.copy()
    out.centroids = np.ascontiguousarray(C.numpy(), dtype=np.float32)
    C = torch.from_numpy(out.centroids).double()  # encode against the float32 centroids the index keeps
    all_codes = []
    for start in range(0, len(x), chunk):
        part = index.rotate(x[start : start + chunk])
        yc = torch.from_numpy(part).double()
        sc = _inverse_norms(yc)
        # the training vectors start from their fitted codes (so the loss only goes down), others
        # from the nearest centroid
        cc = (codes[start : start + len(part)].clone() if whole else
              torch.from_numpy(assign(part, out.centroids).astype(np.int64)))
        _anisotropic_sweep_codes(yc, sc, C, cc, eta, sweeps)
        all_codes.append(cc.numpy().astype(np.uint8))
    out.reset()
    out.add_codes(np.concatenate(all_codes) if all_codes else np.empty((0, M), np.uint8))
    return out
