"""ADC kernels: every path against the NumPy reference (build_lut, adc_scores, adc_topk)."""
import numpy as np
import pytest
import torch

from jpq.kernels import adc_scores, adc_topk, build_lut
from jpq.kernels.adc import adc_scores_reference, build_lut_reference, topk_from_scores
from kernel_cases import assert_topk_matches, backend_params, numpy_of, random_pq, shrink, to_kind
from tolerances import assert_close

BACKENDS = backend_params()

# (M, K, ds, N, nq, k): powers of two and awkward sizes, empty, k > N, one and many queries.
# CPU branches: nq <= FEW_QUERIES (12) -> four-query scans, then one scan per query left (nq = 1,
# 2, 3, 7, 10; K < 256 pads the flat tables' rows); larger nq -> the multi-query kernel, its tile
# padded to a multiple of QUERY_LANES (14 -> 16) or not (64), and nq > QUERIES_PER_TILE ->
# several query tiles (65: a last tile of 1 query; 75: of 11, in fours and ones).
SHAPES = [
    (1, 256, 4, 17, 1, 5),
    (2, 16, 3, 0, 3, 4),
    (3, 7, 5, 100, 1, 150),
    (8, 256, 2, 1000, 7, 10),
    (8, 16, 2, 500, 10, 10),
    (12, 256, 3, 777, 14, 10),
    (16, 256, 1, 2049, 65, 20),
    (4, 256, 2, 300, 75, 7),
    (96, 256, 8, 3001, 2, 100),
    (96, 256, 8, 300, 64, 10),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("span", [None, 48, 1])
def test_triton_topk_breaks_exact_ties_by_smaller_id_across_chunks(monkeypatch, metric, span):
    """Every score is one of 3 values (codes of one sub-quantizer, K = 3), so the k-th place is a
    tie among dozens of documents spread over several chunks: the Triton top-k must keep the
    smallest ids, exactly as the reference does (no tolerance for near-ties here). With `span`,
    the search runs as it does past 2**32 - 2 documents (a key's 32-bit id): span by span, merged."""
    from jpq.kernels import adc as adc_module
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    if span is not None:
        monkeypatch.setattr(adc_module, "TRITON_MAX_SPAN_DOCS", span)
    monkeypatch.setattr(adc_module, "TRITON_KEYS_PER_CHUNK", 1)
    monkeypatch.setattr(adc_module, "TRITON_MIN_DOCS_PER_CHUNK", 16)
    rng = np.random.default_rng(7)
    lut = np.array([[[0.5, -1.25, 0.5]], [[2.0, 2.0, -0.0]]], np.float32)  # (2, 1, 3): exact ties
    codes = rng.integers(0, 3, (200, 1)).astype(np.uint8)
    for k in (1, 7, 30, 250):
        D_ref, I_ref = topk_from_scores(adc_scores_reference(lut, codes), k, metric)
        D, I = adc_topk(torch.from_numpy(lut), torch.from_numpy(codes), k, metric=metric, backend="triton")
        np.testing.assert_array_equal(I.numpy(), I_ref)
        np.testing.assert_array_equal(D.numpy(), D_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("M,K,ds,N,nq,k", SHAPES)
@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_adc_topk_matches_reference(backend, metric, M, K, ds, N, nq, k, as_torch):
    rng = np.random.default_rng(M * 1000 + N + nq)
    N = shrink(N, backend)
    C, codes, q = random_pq(rng, M, K, ds, N, nq)
    lut_ref = build_lut_reference(q, C, metric)
    scores_ref = adc_scores_reference(lut_ref, codes)
    D_ref, I_ref = topk_from_scores(scores_ref, k, metric)
    lut_in, codes_in = to_kind([lut_ref, codes], as_torch)
    D, I = adc_topk(lut_in, codes_in, k, metric=metric, backend=backend)
    assert isinstance(D, torch.Tensor) == as_torch and isinstance(I, torch.Tensor) == as_torch
    scale = np.abs(lut_ref).max() if lut_ref.size else 1.0
    assert_topk_matches(D, I, D_ref, I_ref, scores_ref, atol=4e-6 * M * scale, metric=metric)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,ds,N,nq,k", SHAPES)
@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_adc_topk_with_doc_scale_matches_reference(backend, M, K, ds, N, nq, k, as_torch):
    """doc_scale multiplies each document's summed score before ranking (one-query and
    multi-query CPU kernels, the Triton chunks, the reference); factors spread over 0.2-5 so the
    order really changes."""
    rng = np.random.default_rng(M * 1000 + N + nq + 5)
    N = shrink(N, backend)
    C, codes, q = random_pq(rng, M, K, ds, N, nq)
    doc_scale = np.exp(rng.uniform(-1.6, 1.6, N)).astype(np.float32)
    lut_ref = build_lut_reference(q, C, "ip")
    scores_ref = (adc_scores_reference(lut_ref, codes).astype(np.float64) * doc_scale).astype(np.float32)
    D_ref, I_ref = topk_from_scores(scores_ref, k, "ip")
    lut_in, codes_in, scale_in = to_kind([lut_ref, codes, doc_scale], as_torch)
    D, I = adc_topk(lut_in, codes_in, k, backend=backend, doc_scale=scale_in)
    assert isinstance(D, torch.Tensor) == as_torch
    scale = 5 * (np.abs(lut_ref).max() if lut_ref.size else 1.0)
    assert_topk_matches(D, I, D_ref, I_ref, scores_ref, atol=4e-6 * M * scale)
    if N and nq:
        D0, I0 = adc_topk(lut_in, codes_in, k, backend=backend)  # without it: another ranking
        assert not np.array_equal(numpy_of(I0), numpy_of(I)) or N == 1


@pytest.mark.parametrize("K", [256, 5])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "doc_scale"])
def test_cpu_few_query_scans_match_reference_for_every_count(monkeypatch, K, scaled):
    """Every query count up to FEW_QUERIES and one past it, through the few-query scans (fours,
    then ones) and, for the same tables, through the multi-query kernel alone: both give the
    reference's top-k (both metrics); a query's lane in a four-query scan does not change its result."""
    from jpq.kernels import adc as adc_module

    rng = np.random.default_rng(K + scaled)
    M, N, k = 6, 1500, 9
    C, codes, q = random_pq(rng, M, K, 3, N, adc_module.FEW_QUERIES + 1)
    doc_scale = np.exp(rng.uniform(-1, 1, N)).astype(np.float32) if scaled else None
    for metric in (["ip"] if scaled else ["ip", "l2"]):
        lut_all = build_lut_reference(q, C, metric)
        for nq in range(1, adc_module.FEW_QUERIES + 2):
            lut = lut_all[:nq]
            scores_ref = adc_scores_reference(lut, codes)
            if scaled:
                scores_ref = (scores_ref.astype(np.float64) * doc_scale).astype(np.float32)
            D_ref, I_ref = topk_from_scores(scores_ref, k, metric)
            atol = 4e-6 * M * 3 * np.abs(lut).max()
            D, I = adc_topk(lut, codes, k, metric=metric, backend="cpu", doc_scale=doc_scale)
            assert_topk_matches(D, I, D_ref, I_ref, scores_ref, atol=atol, metric=metric)
            with monkeypatch.context() as patch:
                patch.setattr(adc_module, "FEW_QUERIES", 0)
                D_many, I_many = adc_topk(lut, codes, k, metric=metric, backend="cpu", doc_scale=doc_scale)
            assert_topk_matches(D_many, I_many, D_ref, I_ref, scores_ref, atol=atol, metric=metric)
            np.testing.assert_allclose(adc_scores(lut, codes, backend="cpu"), adc_scores_reference(lut, codes),
                                       rtol=1e-5, atol=atol)
            if nq % 4 == 0:  # reversed, every query stays in a four-query scan, in another lane
                D_rev, I_rev = adc_topk(lut[::-1].copy(), codes, k, metric=metric, backend="cpu", doc_scale=doc_scale)
                np.testing.assert_array_equal(I_rev[::-1], I)
                np.testing.assert_array_equal(D_rev[::-1], D)


@pytest.mark.parametrize("backend", BACKENDS)
def test_doc_scale_of_ones_changes_nothing(backend):
    """x * 1.0f is exact: a scale of ones gives bitwise the unscaled search."""
    rng = np.random.default_rng(11)
    C, codes, q = random_pq(rng, 8, 256, 2, shrink(1000, backend), 9)
    lut = build_lut_reference(q, C, "ip")
    args = to_kind([lut, codes], backend == "triton")
    D0, I0 = adc_topk(*args, 10, backend=backend)
    ones = np.ones(len(codes), np.float32)
    D1, I1 = adc_topk(*args, 10, backend=backend, doc_scale=to_kind([ones], backend == "triton")[0])
    np.testing.assert_array_equal(numpy_of(I0), numpy_of(I1))
    np.testing.assert_array_equal(numpy_of(D0), numpy_of(D1))


@pytest.mark.parametrize(
    "scale, metric, error, match",
    [
        (np.ones(9, np.float32), "ip", ValueError, r"doc_scale must have shape \(10,\)"),
        (np.ones((10, 1), np.float32), "ip", ValueError, "doc_scale must have 1 dimensions"),
        (np.zeros(10, np.float32), "ip", ValueError, "doc_scale must be > 0"),
        (-np.ones(10, np.float32), "ip", ValueError, "doc_scale must be > 0"),
        (np.full(10, np.nan, np.float32), "ip", ValueError, "NaN"),
        (np.ones(10, np.int32), "ip", TypeError, "doc_scale must be a floating"),
        (np.ones(10, np.float32), "l2", ValueError, "needs metric 'ip'"),
        (torch.ones(10), "ip", TypeError, "all NumPy arrays or all torch"),
    ],
)
def test_bad_doc_scale_raises_clear_errors(scale, metric, error, match):
    rng = np.random.default_rng(0)
    lut = rng.standard_normal((2, 4, 8)).astype(np.float32)
    codes = rng.integers(0, 8, (10, 4)).astype(np.uint8)
    with pytest.raises(error, match=match):
        adc_topk(lut, codes, 3, metric=metric, doc_scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,ds,N,nq,k", SHAPES)
def test_adc_scores_matches_reference(backend, M, K, ds, N, nq, k):
    rng = np.random.default_rng(7 + M + N)
    N = shrink(N, backend)
    C, codes, q = random_pq(rng, M, K, ds, N, nq)
    lut = build_lut_reference(q, C, "ip")
    out = adc_scores(lut, codes, backend=backend)
    assert out.shape == (nq, N) and out.dtype == np.float32
    assert_close(out, adc_scores_reference(lut, codes), reduction_length=M, scale=np.abs(lut).max())


@pytest.mark.interpreter
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nq,k", [(1, 5), (3, 20)])
def test_triton_topk_merges_document_chunks(monkeypatch, metric, nq, k):
    """The Triton top-k scores documents in chunks and merges each chunk's top-k with the best
    so far: shrink the chunks so a 200-document search takes several (k = 20 > a chunk too)."""
    from jpq.kernels import adc as adc_module
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    monkeypatch.setattr(adc_module, "TRITON_KEYS_PER_CHUNK", 1)
    monkeypatch.setattr(adc_module, "TRITON_MIN_DOCS_PER_CHUNK", 16)
    rng = np.random.default_rng(nq + k)
    C, codes, q = random_pq(rng, 4, 16, 2, 200, nq)  # K = 16: many tied scores across chunks
    lut = build_lut_reference(q, C, metric)
    scores_ref = adc_scores_reference(lut, codes)
    D_ref, I_ref = topk_from_scores(scores_ref, k, metric)
    D, I = adc_topk(torch.from_numpy(lut), torch.from_numpy(codes), k, metric=metric, backend="triton")
    assert_topk_matches(D, I, D_ref, I_ref, scores_ref, atol=4e-6 * 4 * np.abs(lut).max(), metric=metric)



@pytest.mark.interpreter
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_triton_topk_merges_spans_with_document_scales(monkeypatch, metric):
    """Past 2**32 - 2 documents the Triton top-k runs span by span (a key holds a 32-bit id): with
    spans of 70 documents, a 200-document search (with per-document scales for "ip", as unit-norm
    indexes search) gives the reference's top-k, ids counted across spans, -1 padded where k > N."""
    from jpq.kernels import adc as adc_module
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    monkeypatch.setattr(adc_module, "TRITON_MAX_SPAN_DOCS", 70)
    rng = np.random.default_rng(5)
    C, codes, q = random_pq(rng, 4, 16, 2, 200, 3)
    lut = build_lut_reference(q, C, metric)
    scale = rng.uniform(0.5, 2.0, 200).astype(np.float32) if metric == "ip" else None
    scores_ref = adc_scores_reference(lut, codes) * (1.0 if scale is None else scale)
    for k in (5, 90, 210):
        D_ref, I_ref = adc_topk(lut, codes, k, metric=metric, backend="reference", doc_scale=scale)
        D, I = adc_topk(torch.from_numpy(lut), torch.from_numpy(codes), k, metric=metric, backend="triton",
                        doc_scale=None if scale is None else torch.from_numpy(scale))
        assert_topk_matches(D, I, D_ref, I_ref, scores_ref, atol=4e-6 * 8 * np.abs(lut).max(), metric=metric)
        assert (I.numpy()[:, 200:] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("M,K,ds", [(1, 256, 4), (3, 7, 5), (96, 256, 8), (8, 16, 24)])
def test_build_lut_matches_reference(backend, metric, M, K, ds):
    rng = np.random.default_rng(M + K + ds)
    C, _, q = random_pq(rng, M, K, ds, 0, nq=5)
    lut = build_lut(q, C, metric=metric, backend=backend)
    ref = build_lut_reference(q, C, metric)
    assert lut.shape == (5, M, K) and lut.dtype == np.float32
    assert_close(lut, ref, reduction_length=ds, scale=float(np.abs(ref).max()))
    t = build_lut(torch.from_numpy(q), torch.from_numpy(C), metric=metric, backend=backend)
    assert isinstance(t, torch.Tensor)
    assert_close(t, ref, reduction_length=ds, scale=float(np.abs(ref).max()))


def test_topk_ties_prefer_smaller_ids():
    # every document has the same code -> every score ties; top-k must be ids 0..k-1 on CPU
    lut = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    codes = np.zeros((50, 4), np.uint8)
    for backend in ("reference", "cpu"):
        D, I = adc_topk(lut, codes, 5, backend=backend)
        np.testing.assert_array_equal(I, np.tile(np.arange(5), (2, 1)))


def test_many_queries_take_several_tiles():
    # nq > QUERIES_PER_TILE exercises the query tiling of the CPU path
    from jpq.kernels.adc import QUERIES_PER_TILE

    rng = np.random.default_rng(3)
    C, codes, q = random_pq(rng, 4, 16, 2, 500, nq=QUERIES_PER_TILE * 2 + 3)
    lut = build_lut_reference(q, C, "ip")
    D, I = adc_topk(lut, codes, 7, backend="cpu")
    scores = adc_scores_reference(lut, codes)
    D_ref, I_ref = topk_from_scores(scores, 7, "ip")
    assert_topk_matches(D, I, D_ref, I_ref, scores, atol=1e-4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda lut, c: adc_topk(lut, c.astype(np.float32), 3), TypeError, "codes must be an integer"),
        (lambda lut, c: adc_topk(lut.astype(np.int32), c, 3), TypeError, "lut must be a floating"),
        (lambda lut, c: adc_topk(lut, c[:, :2], 3), ValueError, "expected M=4"),
        (lambda lut, c: adc_topk(lut, np.full_like(c, 9), 3), ValueError, r"values must lie in \[0, 8\)"),
        (lambda lut, c: adc_topk(lut, c, 0), ValueError, "k must be >= 1"),
        (lambda lut, c: adc_topk(lut, c, 2.5), TypeError, "k must be an int"),
        (lambda lut, c: adc_topk(lut, c, 3, metric="cos"), ValueError, "metric must be one of"),
        (lambda lut, c: adc_topk(lut, c, 3, backend="gpu"), ValueError, "backend must be one of"),
        (lambda lut, c: adc_topk(lut[0], c, 3), ValueError, "lut must have 3 dimensions"),
        (lambda lut, c: adc_topk(torch.from_numpy(lut), c, 3), TypeError, "all NumPy arrays or all torch"),
        (lambda lut, c: adc_topk(lut.tolist(), c, 3), TypeError, "lut must be a numpy.ndarray"),
        (lambda lut, c: adc_scores(np.where(lut > 0, np.nan, lut), c), ValueError, "NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    rng = np.random.default_rng(0)
    lut = rng.standard_normal((2, 4, 8)).astype(np.float32)
    codes = rng.integers(0, 8, (10, 4)).astype(np.uint8)
    with pytest.raises(error, match=match):
        call(lut, codes)


def test_build_lut_rejects_bad_dimensions():
    C = np.zeros((4, 8, 3), np.float32)
    with pytest.raises(ValueError, match="D = M \\* ds = 12"):
        build_lut(np.zeros((2, 13), np.float32), C)
    with pytest.raises(ValueError, match="at most 256"):
        build_lut(np.zeros((2, 12), np.float32), np.zeros((4, 300, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        build_lut(np.full((2, 12), np.nan, np.float32), C)


@pytest.mark.parametrize("off", ["0", "", "false", "off", "2"])  # what Triton reads as off
def test_named_triton_backend_raises_when_it_cannot_run(monkeypatch, off):
    from jpq.kernels.arrays import is_interpreter

    monkeypatch.setenv("TRITON_INTERPRET", off)
    assert not is_interpreter()
    lut = np.zeros((1, 2, 4), np.float32)
    codes = np.zeros((3, 2), np.uint8)
    with pytest.raises(RuntimeError, match="triton"):
        adc_topk(lut, codes, 1, backend="triton")
    # auto falls back quietly to the CPU path
    D, I = adc_topk(lut, codes, 1, backend="auto")
    assert numpy_of(I).tolist() == [[0]]


@pytest.mark.parametrize("on", ["1", "true", "On", "yes"])
def test_the_interpreter_is_on_for_what_triton_reads_as_on(monkeypatch, on):
    from jpq.kernels.arrays import is_interpreter

    monkeypatch.setenv("TRITON_INTERPRET", on)
    assert is_interpreter()


def test_check_false_skips_value_checks_never_shapes():
    """adc_topk(check=False) and build_lut(check=False) trust the values (code range, finite
    inputs: each check is a pass that waits for a CUDA device), never the shapes: codes with the
    wrong number of sub-quantizers are refused as with check=True."""
    nan_lut = np.full((1, 2, 16), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        adc_topk(nan_lut, np.zeros((3, 2), np.uint8), 1)
    adc_topk(nan_lut, np.zeros((3, 2), np.uint8), 1, check=False)
    with pytest.raises(ValueError, match="NaN"):
        adc_topk(np.zeros((1, 2, 16), np.float32), np.zeros((3, 2), np.uint8), 1, doc_scale=np.full(3, np.inf, np.float32))
    C, q = np.zeros((2, 16, 3), np.float32), np.full((1, 6), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        build_lut(q, C)
    assert np.isnan(numpy_of(build_lut(q, C, check=False))).all()
    with pytest.raises(ValueError, match="dimension"):
        build_lut(np.zeros((1, 5), np.float32), C, check=False)
    lut = np.zeros((1, 2, 16), np.float32)
    with pytest.raises(ValueError, match="sub-quantizers"):
        adc_topk(lut, np.zeros((3, 1), np.uint8), 1, check=False)
    with pytest.raises(TypeError, match="integer"):
        adc_topk(lut, np.zeros((3, 2), np.float32), 1, check=False)
    D, I = adc_topk(lut, np.zeros((3, 2), np.uint8), 1, check=False)
    assert numpy_of(I).tolist() == [[0]]


@pytest.mark.parametrize("as_torch", [False, True])
def test_code_range_check_rejects_every_out_of_range_value_its_dtype_can_hold(as_torch):
    """check_codes skips the pass over the codes only where no value can be out of range (uint8
    with K = 256); every other dtype is checked, signed ones for negatives too."""
    from jpq.kernels.arrays import check_codes

    def wrap(a):
        return torch.from_numpy(a) if as_torch else a

    ok = np.arange(256, dtype=np.uint8).reshape(64, 4)
    assert check_codes(wrap(ok), 4, 256) is not None
    with pytest.raises(ValueError, match=r"\[0, 16\), found a maximum of 255"):
        check_codes(wrap(ok), 4, 16)  # uint8, K < 256: the maximum is checked
    signed = ok.astype(np.int64)
    signed[3, 2] = -1
    with pytest.raises(ValueError, match=r"found range \[-1, 255\]"):
        check_codes(wrap(signed), 4, 256)
    signed[3, 2] = 256
    with pytest.raises(ValueError, match=r"found range \[0, 256\]"):
        check_codes(wrap(signed), 4, 256)
    wide = ok.astype(np.uint16)
    wide[0, 0] = 300
    with pytest.raises(ValueError, match="found a maximum of 300" if not as_torch else r"found range \[1, 300\]"):
        check_codes(wrap(wide), 4, 256)  # torch's uint16 has no max: checked as int64
    if as_torch:
        for dtype in (torch.uint16, torch.uint32, torch.uint64):
            codes = torch.from_numpy(ok.astype(np.int64)).to(dtype)
            assert check_codes(codes, 4, 256) is codes
            lut = torch.randn(3, 4, 256)
            D, I = adc_topk(lut, codes, 5)
            D_ref, I_ref = adc_topk(lut, codes.to(torch.int64), 5)
            torch.testing.assert_close(D, D_ref)
            torch.testing.assert_close(I, I_ref)
            with pytest.raises(ValueError, match=r"found range \[0, 256\]"):
                check_codes(torch.from_numpy(signed).clamp(min=0).to(dtype), 4, 256)
    assert check_codes(wrap(signed), 4, 256, values=False) is not None  # values=False: shape and dtype only


def _interpreter_or_skip():
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")


@pytest.mark.interpreter
@pytest.mark.parametrize("largest", [True, False], ids=["ip", "l2"])
@pytest.mark.parametrize("with_scale", [False, True], ids=["plain", "doc_scale"])
@pytest.mark.parametrize("k", [7, 200])
def test_block_topk_keys_keep_each_blocks_best_keys(largest, with_scale, k):
    """The top-k kernel's first selection, with tl.sort (select=True, what a GPU runs; the
    interpreter's default skips it): every 128-document block keeps its best min(k, 128) keys,
    best first, exactly the keys of the gather kernel's scores (same summation order), and a
    padding position past N gets INT64_MIN. K = 16 and M = 2: many tied scores in a block."""
    _interpreter_or_skip()
    from jpq.kernels.adc import order_keys, scores_of_keys
    from jpq.kernels.adc_triton import BLOCK_N, adc_block_topk_keys, adc_scores_triton

    rng = np.random.default_rng(k + 2 * largest + with_scale)
    nq, N, M, K, id_base = 2, 300, 2, 16, 1000  # blocks of 128, 128 and 44 documents
    lut = torch.from_numpy(rng.standard_normal((nq, M, K)).astype(np.float32))
    codes = torch.from_numpy(rng.integers(0, K, (N, M)).astype(np.uint8))
    scale = torch.from_numpy(rng.uniform(0.5, 2.0, N).astype(np.float32)) if with_scale else None
    scores = adc_scores_triton(lut, codes) * (scale if with_scale else 1.0)
    ids = torch.arange(id_base, id_base + N).expand(nq, N)
    keys = adc_block_topk_keys(lut, codes, k, largest, scale, id_base=id_base, select=True)
    keep = min(k, BLOCK_N)
    assert keys.shape == (nq, 3 * keep) and keys.dtype == torch.int64
    all_keys = order_keys(scores, ids, largest)
    for blk in range(3):
        block = all_keys[:, blk * BLOCK_N:(blk + 1) * BLOCK_N]
        n_real = block.shape[1]
        want = torch.sort(block, dim=1, descending=True).values[:, :keep]
        got = keys[:, blk * keep:(blk + 1) * keep]
        if keep == BLOCK_N:  # k >= 128: the block keeps all its keys, in document order
            got = torch.sort(got, dim=1, descending=True).values
        assert torch.equal(got[:, :min(keep, n_real)], want[:, :min(keep, n_real)])
        assert bool((got[:, n_real:] == torch.iinfo(torch.int64).min).all())
    # what the keys decode to: real scores and ids of this chunk
    v, i = scores_of_keys(keys[:, :min(keep, N)], largest)
    assert bool(((i >= id_base) & (i < id_base + N)).all())
    np.testing.assert_array_equal(v.numpy(), scores.gather(1, i - id_base).numpy())
    # without selection every key is kept, unsorted, padding included
    every = adc_block_topk_keys(lut, codes, k, largest, scale, id_base=id_base, select=False)
    assert every.shape == (nq, 3 * BLOCK_N)
    assert torch.equal(every[:, :N], all_keys)
    assert bool((every[:, N:] == torch.iinfo(torch.int64).min).all())


def test_adc_tilings_found_wrong_on_a_gpu_are_refused():
    """adc_triton._config refuses more than one document row per thread with more than one
    subspace per step (wrong on an H200, bench/results/gpu_profile.md); the defaults and the
    tilings the card computed right pass."""
    pytest.importorskip("triton")
    from jpq.kernels.adc_triton import _config

    for M in (1, 3, 16, 96, 200):
        _config(M, None)
    for cfg in ({"BLOCK_N": 256, "BLOCK_M": 1, "num_warps": 4}, {"BLOCK_N": 256, "BLOCK_M": 32, "num_warps": 8},
                {"BLOCK_N": 64, "BLOCK_M": 32, "num_warps": 2}):
        _config(96, cfg)
    for cfg in ({"BLOCK_N": 256, "num_warps": 4}, {"BLOCK_N": 128, "BLOCK_M": 8, "num_warps": 2},
                {"BLOCK_N": 512, "BLOCK_M": 2, "num_warps": 8}):
        with pytest.raises(ValueError, match="BLOCK_N <= 32 \\* num_warps"):
            _config(96, cfg)


@pytest.mark.interpreter
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_triton_topk_with_block_selection_keeps_exact_ties_across_chunks(monkeypatch, metric):
    """The path a GPU runs: every block keeps only its best min(k, 128) keys (tl.sort; the
    interpreter's default keeps all), chunks merged: with three distinct scores (K = 3, M = 1)
    the k-th place is a tie among dozens of documents in several blocks and chunks, and the
    result must still be exactly the reference's (smallest ids first)."""
    _interpreter_or_skip()
    from jpq.kernels import adc as adc_module
    from jpq.kernels import adc_triton

    monkeypatch.setattr(adc_triton, "is_interpreter", lambda: False)  # select, as on a GPU
    monkeypatch.setattr(adc_module, "TRITON_KEYS_PER_CHUNK", 1)
    monkeypatch.setattr(adc_module, "TRITON_MIN_DOCS_PER_CHUNK", 150)  # chunks of 150: 2 blocks each
    rng = np.random.default_rng(11)
    lut = np.array([[[0.5, -1.25, 0.5]], [[2.0, 2.0, -0.0]]], np.float32)
    codes = rng.integers(0, 3, (400, 1)).astype(np.uint8)
    for k in (1, 7, 130):
        D_ref, I_ref = topk_from_scores(adc_scores_reference(lut, codes), k, metric)
        D, I = adc_topk(torch.from_numpy(lut), torch.from_numpy(codes), k, metric=metric, backend="triton")
        np.testing.assert_array_equal(I.numpy(), I_ref)
        np.testing.assert_array_equal(D.numpy(), D_ref)
