"""jpq.PQIndex: train/add/search/reconstruct, save/load, faiss interop, bad inputs."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

import jpq
from jpq.index import pack_codes, unpack_codes
from jpq.kernels.adc import adc_scores_reference, build_lut_reference, topk_from_scores
from kernel_cases import assert_topk_matches

faiss = pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 32)).astype(np.float32) * 3
    x = (centers[rng.integers(0, 20, 3000)] + rng.standard_normal((3000, 32))).astype(np.float32)
    q = (centers[rng.integers(0, 20, 25)] + rng.standard_normal((25, 32))).astype(np.float32)
    return x, q


def trained(x, metric="ip", nbits=8, opq=False, M=8):
    index = jpq.PQIndex(x.shape[1], M, nbits=nbits, metric=metric, opq=opq)
    index.train(x, niter=8, opq_iterations=5)
    index.add(x)
    return index


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nbits", [8, 4])
def test_search_equals_reference_adc(data, metric, nbits):
    x, q = data
    index = trained(x, metric, nbits)
    D, I = index.search(q, 10)
    lut = build_lut_reference(q, index.centroids, metric)
    scores = adc_scores_reference(lut, index.codes)
    D_ref, I_ref = topk_from_scores(scores, 10, metric)
    assert_topk_matches(D, I, D_ref, I_ref, scores, atol=1e-4, metric=metric)


def test_pq_search_is_close_to_exact_search(data):
    x, q = data
    index = trained(x, "l2", M=16)
    _, I = index.search(q, 1)
    exact = ((q[:, None] - x[None]) ** 2).sum(-1).argsort(1)[:, :10]
    hit = np.mean([I[i, 0] in exact[i] for i in range(len(q))])
    assert hit >= 0.8, hit


def test_k_larger_than_ntotal_pads_like_faiss(data):
    x, q = data
    index = jpq.PQIndex(32, 4, metric="ip")
    index.train(x, niter=2)
    index.add(x[:3])
    D, I = index.search(q[:2], 6)
    assert I.shape == (2, 6) and (I[:, 3:] == -1).all() and (I[:, :3] >= 0).all()
    assert (D[:, 3:] == -np.finfo(np.float32).max).all()
    empty = jpq.PQIndex(32, 4, metric="l2")
    empty.centroids = index.centroids
    D, I = empty.search(q[:2], 2)
    assert (I == -1).all() and (D == np.finfo(np.float32).max).all()


def test_torch_in_torch_out(data):
    x, q = data
    index = trained(x)
    D, I = index.search(torch.from_numpy(q), 5)
    assert isinstance(D, torch.Tensor) and I.dtype == torch.int64 and D.dtype == torch.float32
    D2, I2 = index.search(q, 5)
    np.testing.assert_array_equal(I.numpy(), I2)
    codes = index.encode(torch.from_numpy(x[:7]))  # encode / decode too, as faiss' torch_utils do
    assert isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8
    np.testing.assert_array_equal(codes.numpy(), index.encode(x[:7]))
    recon = index.decode(codes)
    assert isinstance(recon, torch.Tensor) and recon.dtype == torch.float32
    np.testing.assert_array_equal(recon.numpy(), index.decode(codes.numpy()))
    # bfloat16 (which NumPy lacks) is converted like float16 and float64
    D3, I3 = index.search(torch.from_numpy(q).bfloat16(), 5)
    np.testing.assert_array_equal(I3.numpy(), index.search(torch.from_numpy(q).bfloat16().float(), 5)[1].numpy())


def test_integer_arguments_are_not_truncated(data):
    x, _ = data
    index = trained(x)
    with pytest.raises(TypeError, match="i must be an int, got float"):
        index.reconstruct(1.7)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        index.reconstruct_n(0, 2.0)
    with pytest.raises(TypeError, match="niter must be an int, got float"):
        index.train(x, niter=2.5)
    with pytest.raises(ValueError, match="niter must be >= 1, got -1"):
        index.train(x, niter=-1)
    with pytest.raises(ValueError, match="opq_iterations must be >= 1"):
        index.train(x, opq_iterations=0)
    np.testing.assert_array_equal(index.reconstruct(np.int64(3)), index.reconstruct_n(3, 1)[0])


@pytest.mark.interpreter
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("opq", [False, True])
def test_torch_queries_searched_on_their_device_with_triton(data, metric, opq):
    """backend="triton" (and "auto" for CUDA queries) searches on the queries' device: rotation,
    LUT and Triton top-k there, against cached device copies of codes and centroids. Under the
    CPU interpreter the device is the CPU: same results as the CPU fast path, torch out, and the
    cache follows add / reset."""
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    x, q = data
    index = jpq.PQIndex(32, 8, nbits=6, metric=metric, opq=opq)
    index.train(x, niter=5, opq_iterations=3)
    index.add(x[:400])
    qt = torch.from_numpy(q[:6])

    def check(k):
        D, I = index.search(qt, k, backend="triton")
        assert isinstance(D, torch.Tensor) and D.device == qt.device and I.dtype == torch.int64
        lut = build_lut_reference(index.rotate(q[:6]), index.centroids, metric)
        scores = adc_scores_reference(lut, index.codes)
        D_ref, I_ref = topk_from_scores(scores, k, metric)
        assert_topk_matches(D, I, D_ref, I_ref, scores, atol=1e-4, metric=metric)

    check(10)
    index.add(x[400:700])  # new codes: the device copy is rebuilt
    check(10)
    assert index._device_cache[2][0].shape[0] == 700
    check(800)  # k > ntotal: -1 padding
    index.reset()
    D, I = index.search(qt, 3, backend="triton")
    assert (I == -1).all()
    with pytest.raises(ValueError, match="shape"):
        index.search(qt[:, :5], 3, backend="triton")


@pytest.mark.parametrize("opq", [False, True])
def test_reconstruct_matches_decode(data, opq):
    x, _ = data
    index = trained(x, "l2", opq=opq)
    rec = index.reconstruct_n(0, 50)
    np.testing.assert_allclose(index.reconstruct(7), rec[7], rtol=1e-6, atol=1e-6)
    err = ((rec - x[:50]) ** 2).sum(1).mean() / (x[:50] ** 2).sum(1).mean()
    assert err < 0.3, err
    with pytest.raises(IndexError):
        index.reconstruct(len(x))


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("opq", [False, True])
@pytest.mark.parametrize("nbits", [8, 4, 5])
def test_faiss_round_trip_identical_topk(data, metric, opq, nbits):
    x, q = data
    index = trained(x, metric, nbits=nbits, opq=opq)
    D, I = index.search(q, 10)
    f = index.to_faiss()
    Df, If = f.search(q, 10)
    lut = build_lut_reference(index.rotate(q), index.centroids, metric)
    scores = adc_scores_reference(lut, index.codes)
    assert_topk_matches(Df.astype(np.float32), If.astype(np.int64), D, I, scores, atol=1e-4, metric=metric)
    back = jpq.PQIndex.from_faiss(f)
    np.testing.assert_array_equal(back.codes, index.codes)
    np.testing.assert_array_equal(back.centroids, index.centroids)
    assert back.metric == metric and back.nbits == nbits and back.opq == opq
    D2, I2 = back.search(q, 10)
    np.testing.assert_array_equal(I2, I)
    # the exported index reconstructs and decodes as jpq does (faiss' reverse transform needs the
    # rotation marked orthonormal)
    np.testing.assert_allclose(f.reconstruct_n(0, index.ntotal), index.reconstruct_n(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f.sa_decode(f.sa_encode(x[:20])), index.decode(index.encode(x[:20])),
                               rtol=1e-5, atol=1e-5)


def test_from_faiss_built_by_faiss(data):
    x, q = data
    f = faiss.IndexPQ(32, 8, 8, faiss.METRIC_INNER_PRODUCT)
    f.train(x)
    f.add(x)
    ours = jpq.PQIndex.from_faiss(f)
    D, I = ours.search(q, 10)
    Df, If = f.search(q, 10)
    lut = build_lut_reference(q, ours.centroids, "ip")
    scores = adc_scores_reference(lut, ours.codes)
    assert_topk_matches(D, I, Df.astype(np.float32), If.astype(np.int64), scores, atol=1e-4)
    np.testing.assert_array_equal(ours.codes, faiss.vector_to_array(f.codes).reshape(-1, 8))


def test_from_faiss_rejects_other_indexes():
    with pytest.raises(TypeError, match="expected a faiss IndexPQ"):
        jpq.PQIndex.from_faiss(faiss.IndexFlatL2(8))


@pytest.mark.parametrize("nbits", [1, 3, 4, 5, 7, 8])
def test_pack_unpack_round_trip(nbits):
    rng = np.random.default_rng(nbits)
    codes = rng.integers(0, 1 << nbits, (37, 5)).astype(np.uint8)
    packed = pack_codes(codes, nbits)
    assert packed.shape == (37, (5 * nbits + 7) // 8)
    np.testing.assert_array_equal(unpack_codes(packed, 5, nbits), codes)


@pytest.mark.parametrize("opq", [False, True])
def test_save_load_round_trip(tmp_path, data, opq):
    x, q = data
    index = trained(x, "l2", opq=opq)
    path = tmp_path / "index.jpq"
    index.save(path)
    back = jpq.PQIndex.load(path)
    assert repr(back) == repr(index)
    np.testing.assert_array_equal(back.codes, index.codes)
    np.testing.assert_array_equal(back.centroids, index.centroids)
    np.testing.assert_array_equal(back.search(q, 5)[1], index.search(q, 5)[1])
    assert [p.name for p in tmp_path.iterdir()] == ["index.jpq"]  # no temp file left behind


def test_load_rejects_truncated_foreign_and_corrupted_files(tmp_path, data):
    x, _ = data
    index = trained(x)
    path = tmp_path / "index.jpq"
    index.save(path)
    blob = path.read_bytes()
    (tmp_path / "cut").write_bytes(blob[:-10])
    with pytest.raises(ValueError, match="truncated"):
        jpq.PQIndex.load(tmp_path / "cut")
    (tmp_path / "cut2").write_bytes(blob[:10])
    with pytest.raises(ValueError, match="truncated"):
        jpq.PQIndex.load(tmp_path / "cut2")
    (tmp_path / "foreign").write_bytes(b"\x89PNG\r\n\x1a\n" + blob[8:])
    with pytest.raises(ValueError, match="not a jpq index"):
        jpq.PQIndex.load(tmp_path / "foreign")
    flipped = bytearray(blob)
    flipped[-1] ^= 0xFF
    (tmp_path / "flip").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        jpq.PQIndex.load(tmp_path / "flip")



def rewrite_header(src, dst, edit):
    """Copy a saved index with its JSON header replaced by edit(header) (the checksum covers
    only the payload, so such a file passes it)."""
    blob = src.read_bytes()
    magic = jpq.index.FORMAT_MAGIC
    n = int.from_bytes(blob[len(magic):len(magic) + 4], "little")
    header = edit(json.loads(blob[len(magic) + 4:len(magic) + 4 + n]))
    text = json.dumps(header).encode()
    dst.write_bytes(magic + len(text).to_bytes(4, "little") + text + blob[len(magic) + 4 + n:])


def test_load_rejects_edited_headers(tmp_path, data):
    x, _ = data
    path = tmp_path / "index.jpq"
    trained(x, nbits=4).save(path)
    cases = {"missing nbits": lambda h: {k: v for k, v in h.items() if k != "nbits"},
             "a JSON object expected": lambda h: [h],
             "invalid parameters": lambda h: {**h, "M": "eight"},
             "centroids must be a float32 array of shape": lambda h: {**h, "nbits": 8},
             "arrays a jpq index does not have": lambda h: {**h, "arrays": {**h["arrays"],
                                                                             "ntotal": h["arrays"]["codes"]}},
             "corrupted array table": lambda h: {**h, "arrays": {"codes": {"dtype": "uint8"}}}}
    for message, edit in cases.items():
        rewrite_header(path, tmp_path / "edited.jpq", edit)
        with pytest.raises(ValueError, match=message):
            jpq.PQIndex.load(tmp_path / "edited.jpq")


def test_load_rejects_well_formed_files_with_wrong_contents(tmp_path, data):
    """A checksummed file whose arrays do not fit (d, M, K) (codes >= K, other shapes) is refused
    on load: search skips the per-call pass over the codes and must never read out of bounds."""
    x, _ = data
    index = trained(x, nbits=4)
    bad_codes = jpq.PQIndex(32, 8, nbits=4)
    bad_codes.centroids = index.centroids
    bad_codes.codes = np.full((5, 8), 200, np.uint8)  # K = 16
    bad_codes.save(tmp_path / "codes.jpq")
    with pytest.raises(ValueError, match="codes values must lie in"):
        jpq.PQIndex.load(tmp_path / "codes.jpq")
    bad_shape = jpq.PQIndex(32, 8, nbits=4)
    bad_shape.centroids = index.centroids[:, :8]
    bad_shape.save(tmp_path / "shape.jpq")
    with pytest.raises(ValueError, match="centroids must be a float32 array of shape"):
        jpq.PQIndex.load(tmp_path / "shape.jpq")


def test_from_faiss_rejects_an_untrained_rotation():
    with pytest.raises(ValueError, match="OPQMatrix is not trained"):
        jpq.PQIndex.from_faiss(faiss.index_factory(16, "OPQ4,PQ4"))


def test_from_faiss_rejects_a_transform_that_is_not_a_rotation(data):
    x, q = data
    f = faiss.IndexPQ(32, 8, 8, faiss.METRIC_INNER_PRODUCT)
    lt = faiss.LinearTransform(32, 32, False)
    faiss.copy_array_to_vector((2.0 * np.eye(32, dtype=np.float32)).ravel(), lt.A)
    lt.is_trained = True
    wrapped = faiss.IndexPreTransform(lt, f)
    with pytest.raises(ValueError, match="orthonormal"):
        jpq.PQIndex.from_faiss(wrapped)


def test_train_rejects_max_train_points_below_k(data):
    x, _ = data
    with pytest.raises(ValueError, match="max_train_points"):
        jpq.PQIndex(32, 8, nbits=8).train(x, max_train_points=100)

def test_failed_save_leaves_no_broken_file(tmp_path, data, monkeypatch):
    x, _ = data
    index = trained(x)
    path = tmp_path / "index.jpq"
    index.save(path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    index.add(x[:5])
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.jpq"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(d=10, M=3), ValueError, "not divisible"),
        (dict(d=8, M=2, nbits=9), ValueError, "nbits must be in 1..8"),
        (dict(d=8, M=2, metric="cosine"), ValueError, "metric must be one of"),
        (dict(d=8.0, M=2), TypeError, "d must be an int"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        jpq.PQIndex(**kwargs)


def test_usage_errors(data):
    x, q = data
    index = jpq.PQIndex(32, 4)
    with pytest.raises(RuntimeError, match="not trained"):
        index.add(x)
    with pytest.raises(ValueError, match="at least K=256"):
        index.train(x[:100])
    index.train(x, niter=2)
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        index.add(x[:, :16])
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 32), np.nan, np.float32), 1)
    with pytest.raises(TypeError, match="floating"):
        index.search(q.astype(np.int32), 1)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 256\)"):
        index.decode(np.full((1, 4), 300, np.int64))


# --------------------------------------------------------------------------- query-aware codebooks
def _anisotropic(seed=0, d=32, n=4000, nq=3000):
    """Documents isotropic, queries concentrated on a few directions (a random basis)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = rng.standard_normal((n, d)).astype(np.float32)
    q = ((rng.standard_normal((nq, d)) * np.geomspace(3.0, 0.05, d)) @ basis.T).astype(np.float32)
    return x, q


@pytest.mark.parametrize("opq", [False, True])
def test_query_aware_codebooks_cut_the_error_queries_see(opq):
    from jpq.index import query_aware_codebooks

    x, q = _anisotropic()
    plain = jpq.PQIndex(32, 8, nbits=4, opq=opq).train(x, seed=0)
    plain.add(x)
    aware = query_aware_codebooks(plain, x, q[:1500], shrinkage=0.3)
    held_out = q[1500:]  # queries the codebooks never saw, same distribution

    def errors(ix):
        e = x - ix.decode(ix.codes)
        return float(((held_out @ e.T) ** 2).mean()), float((e ** 2).sum(1).mean())
    (qe_plain, l2_plain), (qe_aware, l2_aware) = errors(plain), errors(aware)
    assert qe_aware < 0.9 * qe_plain  # the inner-product error queries see drops
    assert l2_aware > l2_plain  # paid for with plain reconstruction error: a real trade, not a copy
    assert aware.ntotal == len(x) and plain.ntotal == len(x)
    assert aware.opq == opq and (aware.rotation is None) == (not opq)
    # the index it came from is untouched; the result searches, saves and exports like any PQIndex
    assert not np.array_equal(aware.centroids, plain.centroids)
    D, I = aware.search(held_out[:5], 10)
    assert I.shape == (5, 10) and (I >= 0).all()


def test_query_aware_codebooks_with_shrinkage_one_are_plain_kmeans():
    from jpq.index import query_aware_codebooks

    x, q = _anisotropic(seed=1)
    plain = jpq.PQIndex(32, 8, nbits=4).train(x, seed=0)
    plain.add(x)
    one = query_aware_codebooks(plain, x, q, shrinkage=1.0)  # S' = I: more Lloyd iterations from plain's codebooks
    np.testing.assert_array_equal(one.codes, one.encode(x))  # codes are the plain nearest centroids

    def l2(ix):
        return float(((x - ix.decode(ix.codes)) ** 2).sum(1).mean())
    assert l2(one) <= l2(plain) + 1e-6  # Lloyd refinement never raises the k-means objective


def test_query_aware_codebooks_reject_bad_input():
    from jpq.index import query_aware_codebooks

    x, q = _anisotropic(seed=2, n=300, nq=50)
    ix = jpq.PQIndex(32, 8, nbits=4).train(x, seed=0)
    with pytest.raises(ValueError, match="shrinkage"):
        query_aware_codebooks(ix, x, q, shrinkage=0.0)
    with pytest.raises(ValueError, match="shrinkage"):
        query_aware_codebooks(ix, x, q, shrinkage=1.5)
    with pytest.raises(ValueError, match="queries"):
        query_aware_codebooks(ix, x, q[:, :16])
    with pytest.raises(ValueError, match="at least one"):
        query_aware_codebooks(ix, x, q[:0])
    with pytest.raises(ValueError, match="inner-product"):
        query_aware_codebooks(jpq.PQIndex(32, 8, nbits=4, metric="l2").train(x, seed=0), x, q)
    with pytest.raises(TypeError, match="PQIndex"):
        query_aware_codebooks("index", x, q)
    with pytest.raises(RuntimeError):
        query_aware_codebooks(jpq.PQIndex(32, 8, nbits=4), x, q)


# --------------------------------------------------------------------------- anisotropic codebooks
def _clustered_unit(seed=0, d=16, n=1200, clusters=12):
    """Unit vectors around a few directions (as sentence embeddings are)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _aniso_brute(y, C, eta):
    """Loss of every code combination for each row of y (M = 1 or 2): (n, K) or (n, K, K)."""
    u = y / np.linalg.norm(y, axis=1, keepdims=True)
    M, K, ds = C.shape
    if M == 1:
        r = y[:, None, :] - C[0][None]
        return (r ** 2).sum(-1) + (eta - 1) * ((r * u[:, None, :]).sum(-1)) ** 2
    full = np.concatenate([np.repeat(C[0][:, None], K, 1), np.repeat(C[1][None], K, 0)], -1)  # (K, K, d)
    r = y[:, None, None, :] - full[None]
    return (r ** 2).sum(-1) + (eta - 1) * ((r * u[:, None, None, :]).sum(-1)) ** 2


@pytest.mark.parametrize("M", [1, 2])
def test_anisotropic_codes_are_the_brute_force_minimum_per_sub_quantizer(M):
    from jpq.index import _anisotropic_sweep_codes

    x = _clustered_unit(seed=3, d=8, n=300).astype(np.float64)
    rng = np.random.default_rng(0)
    C = torch.from_numpy(rng.standard_normal((M, 6, 8 // M)) * 0.3)
    y = torch.from_numpy(x)
    codes = torch.zeros(len(x), M, dtype=torch.int64)
    _anisotropic_sweep_codes(y, 1.0 / y.norm(dim=1), C, codes, 5.0, sweeps=20)
    loss = _aniso_brute(x, C.numpy(), 5.0)
    rows = np.arange(len(x))
    if M == 1:  # a single sub-quantizer: coordinate descent is exact
        np.testing.assert_array_equal(codes[:, 0].numpy(), loss.argmin(1))
    else:  # a coordinate-wise minimum: no single code change lowers the loss
        c = codes.numpy()
        here = loss[rows, c[:, 0], c[:, 1]]
        assert (here <= loss[rows, :, c[:, 1]].min(1) + 1e-12).all()
        assert (here <= loss[rows, c[:, 0], :].min(1) + 1e-12).all()


def test_anisotropic_codebook_update_is_the_exact_least_squares_solution():
    from jpq.index import _anisotropic_sweep_codes, _anisotropic_update_codebooks

    x = torch.from_numpy(_clustered_unit(seed=4, d=12, n=500).astype(np.float64))
    rng = np.random.default_rng(1)
    M, K, eta = 3, 8, 6.0
    C = torch.from_numpy(rng.standard_normal((M, K, 4)) * 0.3)
    codes = torch.from_numpy(rng.integers(0, K, (len(x), M)))
    u_scale = 1.0 / x.norm(dim=1)
    s = _anisotropic_sweep_codes(x, u_scale, C, codes, eta, sweeps=1)
    # each sub-quantizer is solved with the others held: repeating the block updates converges to
    # the joint least-squares optimum for these codes, where the gradient vanishes
    for _ in range(60):
        s = _anisotropic_update_codebooks(x, x * u_scale[:, None], C, codes, s, eta)
    Cg = C.clone().requires_grad_(True)
    r = x - Cg[torch.arange(M), codes].reshape(len(x), -1)
    loss = (r.pow(2).sum(1) + (eta - 1) * ((r * x).sum(1) * u_scale).pow(2)).sum()
    loss.backward()
    assert Cg.grad.abs().max() < 1e-6 * len(x)
    # the returned residual projection matches the codebooks
    np.testing.assert_allclose(s.numpy(), ((r * x).sum(1) * u_scale).detach().numpy(), atol=1e-10)


@pytest.mark.parametrize("opq", [False, True])
def test_anisotropic_codebooks_lower_their_loss_and_the_parallel_error(opq):
    from jpq.index import anisotropic_codebooks, anisotropic_loss

    x = _clustered_unit(seed=0, d=32, n=3000)
    plain = jpq.PQIndex(32, 8, nbits=4, opq=opq).train(x, seed=0)
    plain.add(x)
    before = plain.codes.copy()
    losses = [anisotropic_loss(anisotropic_codebooks(plain, x, eta=4.0, iterations=i), x, 4.0) for i in (0, 1, 3, 6)]
    assert losses[0] <= anisotropic_loss(plain, x, 4.0) + 1e-6  # a code sweep alone never raises it
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))  # no step increases the loss
    aniso = anisotropic_codebooks(plain, x, eta=4.0)
    np.testing.assert_array_equal(plain.codes, before)  # the given index is left alone

    def parts(ix):
        y = ix.rotate(x)
        r = y - ix.centroids[np.arange(ix.M)[None, :], ix.codes].reshape(len(x), -1)
        par = (r * y).sum(1) / np.linalg.norm(y, axis=1)
        return float((par ** 2).mean()), float((r ** 2).sum(1).mean())
    (par_plain, l2_plain), (par_aniso, l2_aniso) = parts(plain), parts(aniso)
    assert par_aniso < 0.6 * par_plain  # the error along the vectors drops...
    assert l2_aniso > l2_plain  # ...paid with plain squared error: a real trade, not a copy
    assert aniso.opq == opq and aniso.ntotal == len(x) and (aniso.rotation is None) == (not opq)
    q = x[:5]
    D, I = aniso.search(q, 10)
    assert I.shape == (5, 10) and (I >= 0).all()


def test_anisotropic_codebooks_with_eta_one_are_lloyd_refinement_and_subsample_encode_all():
    from jpq.index import anisotropic_codebooks, anisotropic_loss

    x = _clustered_unit(seed=1, d=16, n=1500)
    plain = jpq.PQIndex(16, 4, nbits=4).train(x, niter=3, seed=0)
    plain.add(x)
    one = anisotropic_codebooks(plain, x, eta=1.0, iterations=4, sweeps=1)
    np.testing.assert_array_equal(one.codes, one.encode(x))  # eta = 1: the codes are the nearest centroids
    assert anisotropic_loss(one, x, 1.0) <= anisotropic_loss(plain, x, 1.0) + 1e-7
    # codebooks fitted on a subsample, every vector encoded, in chunks, with the same result as one chunk
    sub = anisotropic_codebooks(plain, x, eta=4.0, max_train_points=400, chunk=256)
    sub_one = anisotropic_codebooks(plain, x, eta=4.0, max_train_points=400)
    assert sub.ntotal == len(x)
    np.testing.assert_array_equal(sub.codes, sub_one.codes)
    assert anisotropic_loss(sub, x, 4.0) < anisotropic_loss(plain, x, 4.0)
    # torch input is accepted; zero vectors are encoded by plain squared error without NaNs
    z = np.concatenate([x, np.zeros((20, 16), np.float32)])
    withzero = anisotropic_codebooks(plain, torch.from_numpy(z), eta=4.0, iterations=2)
    assert withzero.ntotal == len(z) and np.isfinite(withzero.centroids).all()


def test_anisotropic_codebooks_reject_bad_input():
    from jpq.index import anisotropic_codebooks

    x = _clustered_unit(seed=2, d=16, n=300)
    ix = jpq.PQIndex(16, 4, nbits=4).train(x, seed=0)
    for eta in (0.5, float("nan"), float("inf"), True, "4"):
        with pytest.raises(ValueError, match="eta"):
            anisotropic_codebooks(ix, x, eta=eta)
    with pytest.raises(ValueError, match="iterations"):
        anisotropic_codebooks(ix, x, iterations=-1)
    with pytest.raises(ValueError, match="sweeps"):
        anisotropic_codebooks(ix, x, sweeps=0)
    with pytest.raises(ValueError, match="x must have shape"):
        anisotropic_codebooks(ix, x[:, :8])
    with pytest.raises(ValueError, match="at least K"):
        anisotropic_codebooks(ix, x[:10])
    with pytest.raises(ValueError, match="inner-product"):
        anisotropic_codebooks(jpq.PQIndex(16, 4, nbits=4, metric="l2").train(x, seed=0), x)
    with pytest.raises(TypeError, match="PQIndex"):
        anisotropic_codebooks("index", x)
    with pytest.raises(RuntimeError):
        anisotropic_codebooks(jpq.PQIndex(16, 4, nbits=4), x)


# --------------------------------------------------------------------------- unit-norm reconstructions
def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("opq", [False, True])
@pytest.mark.parametrize("nq", [1, 25])  # the one-query and the multi-query CPU kernels
def test_unit_norm_search_scores_the_rescaled_reconstructions(data, opq, nq):
    """unit_norm: search ranks by q . x_hat / ||x_hat||, which is q . decode(code), on every path;
    the codes and centroids are those of the plain index, and the ranking differs from it."""
    x, q = data
    x, q = _unit(x), q[:nq]
    plain = trained(x, opq=opq)
    index = jpq.PQIndex(32, 8, opq=opq, unit_norm=True)
    index.train(x, niter=8, opq_iterations=5)
    index.add(x)
    np.testing.assert_array_equal(index.codes, plain.codes)
    rec = index.decode(index.codes)
    np.testing.assert_allclose(np.linalg.norm(rec, axis=1), 1.0, rtol=1e-5)
    raw = plain.decode(plain.codes)
    norms = np.linalg.norm(raw, axis=1)
    np.testing.assert_allclose(index.reconstruction_norms(), norms, rtol=1e-5)
    assert norms.std() > 0.01  # the rescaling is not a no-op on this data
    scores = (q.astype(np.float64) @ (raw / norms[:, None]).T.astype(np.float64)).astype(np.float32)
    D_ref, I_ref = topk_from_scores(scores, 20, "ip")
    for backend in ("cpu", "reference"):
        D, I = index.search(q, 20, backend=backend)
        assert_topk_matches(D, I, D_ref, I_ref, scores, atol=1e-4)
    assert not np.array_equal(index.search(q, 20)[1], plain.search(q, 20)[1])


@pytest.mark.interpreter
def test_unit_norm_device_search_matches_the_cpu(data):
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    x, q = data
    x = _unit(x[:400])
    index = jpq.PQIndex(32, 8, nbits=6, opq=True, unit_norm=True)
    index.train(x, niter=5, opq_iterations=3)
    index.add(x)
    D, I = index.search(q[:6], 10)
    Dt, It = index.search(torch.from_numpy(q[:6]), 10, backend="triton")
    rec = index.decode(index.codes)  # rescaled to unit norm: the search scores are q . rec
    scores = (q[:6] @ rec.T).astype(np.float32)
    assert_topk_matches(Dt, It, D, I, scores, atol=1e-4)


def test_unit_norm_device_scales_are_kept_until_the_device_copies_change(data, monkeypatch):
    """A unit_norm search on the device computes the 1 / ||x_hat|| scales (a pass over all codes)
    once per set of device copies: again after add (new codes), new centroids or
    drop_device_copies, and the results stay those of a fresh computation."""
    from jpq import index as index_module
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    x, q = data
    x = _unit(x[:300])
    index = jpq.PQIndex(32, 8, nbits=6, opq=False, unit_norm=True)
    index.train(x, niter=5)
    index.add(x[:200])
    device_calls = []
    real = index_module.unit_norm_scale

    def counting(centroids, codes, **kw):
        if isinstance(codes, torch.Tensor):  # the device search's (the CPU search keeps NumPy scales)
            device_calls.append(1)
        return real(centroids, codes, **kw)

    monkeypatch.setattr(index_module, "unit_norm_scale", counting)
    qt = torch.from_numpy(q[:3])
    steps = [(1, None), (1, None), (2, lambda: index.add(x[200:260])),
             (3, lambda: setattr(index, "centroids", index.centroids * 2.0)), (4, index.drop_device_copies)]
    for expected, change in steps:
        if change is not None:
            change()
        Dt, It = index.search(qt, 5, backend="triton")
        D, I = index.search(q[:3], 5)
        np.testing.assert_array_equal(It.numpy(), I)
        np.testing.assert_allclose(Dt.numpy(), D, rtol=1e-5, atol=1e-5)
        assert len(device_calls) == expected


def test_unit_norm_saves_loads_and_refuses_faiss_export(tmp_path, data):
    x, q = data
    x = _unit(x)
    index = jpq.PQIndex(32, 8, opq=True, unit_norm=True)
    index.train(x, niter=5, opq_iterations=3)
    index.add(x)
    index.save(tmp_path / "u.jpq")
    back = jpq.PQIndex.load(tmp_path / "u.jpq")
    assert back.unit_norm and "unit_norm=True" in repr(back)
    np.testing.assert_array_equal(back.search(q, 5)[1], index.search(q, 5)[1])
    with pytest.raises(ValueError, match="unit_norm=True.*no faiss index"):
        index.to_faiss()
    index.unit_norm = False  # the plain inner products over the same codes export as before
    f = index.to_faiss()
    np.testing.assert_array_equal(f.search(q, 5)[1], index.search(q, 5)[1])


def test_unit_norm_constructor_errors():
    with pytest.raises(ValueError, match="needs metric 'ip'"):
        jpq.PQIndex(8, 2, metric="l2", unit_norm=True)
    with pytest.raises(TypeError, match="unit_norm must be a bool"):
        jpq.PQIndex(8, 2, unit_norm="yes")


def test_unit_norm_index_refuses_vectors_that_are_not_unit_norm(data):
    x, _ = data
    index = jpq.PQIndex(32, 8, unit_norm=True)
    index.train(x, niter=2)  # training needs no unit norm (the codebooks are plain k-means)
    with pytest.raises(ValueError, match="unit_norm=True, but x has norms in"):
        index.add(x)
    index.add(_unit(x[:10]))
    assert index.ntotal == 10


def test_unit_norm_scales_follow_new_codes_and_edited_centroids(data):
    """The per-document scales are kept between searches and made again when the codes or the
    centroids are replaced, or the centroids are edited in place."""
    x, q = data
    x = _unit(x)
    index = jpq.PQIndex(32, 8, unit_norm=True)
    index.train(x, niter=5)
    index.add(x[:1000])

    def expected():
        raw = jpq.PQIndex(32, 8)
        raw.centroids, raw.codes = index.centroids, index.codes
        rec = raw.decode(raw.codes)
        return topk_from_scores((q @ (rec / np.linalg.norm(rec, axis=1, keepdims=True)).T).astype(np.float32), 10, "ip")

    np.testing.assert_array_equal(index.search(q, 10)[1], expected()[1])
    index.add(x[1000:1500])  # replaced codes
    np.testing.assert_array_equal(index.search(q, 10)[1], expected()[1])
    rng = np.random.default_rng(1)
    index.centroids[:, :, :] *= rng.uniform(0.3, 3.0, (8, 256, 1)).astype(np.float32)  # in place
    np.testing.assert_array_equal(index.search(q, 10)[1], expected()[1])
    index.centroids = index.centroids[::-1].copy()  # replaced
    np.testing.assert_array_equal(index.search(q, 10)[1], expected()[1])


@pytest.mark.parametrize("n", [1, 7, 300])  # NumPy below SMALL_MATMUL (7 x 384 x 384 < 2**20), torch above
def test_matmul_t_equals_numpy_product(n):
    """`matmul_t` (the rotation and tree products; torch above SMALL_MATMUL so that NumPy's BLAS
    threads do not spin beside the numba scans) computes x @ w.T, for read-only and strided
    inputs too, without touching them, and returns a C-contiguous float32 array."""
    from jpq.index import SMALL_MATMUL, matmul_t

    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 2 * 384)).astype(np.float32)[:, ::2]  # strided
    w = rng.standard_normal((384, 384)).astype(np.float32)
    w.flags.writeable = False
    x_before, w_before = x.copy(), w.copy()
    out = matmul_t(x, w)
    assert out.shape == (n, 384) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(w, w_before)
    assert (n * 384 * 384 < SMALL_MATMUL) == (n < 8)


@pytest.mark.parametrize("nq", [3, 1100])  # the rotation by NumPy (3 x 32 x 32), by torch (1100 x 32 x 32 >= 2**20)
def test_opq_search_is_search_of_the_rotated_queries(data, nq):
    """An OPQ index searches q @ R.T in its plain PQ (`matmul_t`: NumPy or torch by size)."""
    xb, xq = data
    xq = xq[np.arange(nq) % len(xq)] + np.float32(0.01) * np.arange(nq, dtype=np.float32)[:, None]
    index = trained(xb, opq=True)
    D, I = index.search(xq, 10)
    rotated = (xq.astype(np.float64) @ index.rotation.T.astype(np.float64)).astype(np.float32)
    lut = build_lut_reference(rotated, index.centroids, "ip")
    scores = adc_scores_reference(lut, index.codes)
    D_ref, I_ref = topk_from_scores(scores, 10, "ip")
    assert_topk_matches(D, I, D_ref, I_ref, scores, atol=1e-4)


# --------------------------------------------------------------------------- ids (faiss IndexIDMap2)
def with_ids(x, ids, opq=False, metric="ip"):
    index = jpq.PQIndex(x.shape[1], 8, metric=metric, opq=opq)
    index.train(x, niter=8, opq_iterations=5)
    index.add_with_ids(x, ids)
    return index


def test_add_with_ids_searches_as_positions_mapped_through_the_ids(data):
    x, q = data
    ids = np.random.default_rng(1).permutation(len(x)) * 10**9 + 12345  # large, unsorted
    index = with_ids(x, ids)
    plain = jpq.PQIndex(32, 8)
    plain.centroids, plain.codes = index.centroids, index.codes
    D, I = index.search(q, 10)
    D0, I0 = plain.search(q, 10)
    np.testing.assert_array_equal(D, D0)
    np.testing.assert_array_equal(I, ids[I0])
    # padding stays -1 past ntotal; torch in, torch out, ids as int64
    small = with_ids(x[:300], np.arange(300) + 7)
    D, I = small.search(torch.from_numpy(q), 305)
    assert isinstance(I, torch.Tensor) and I.dtype == torch.int64
    assert (I[:, 300:] == -1).all() and set(I[0, :300].tolist()) == set(range(7, 307))
    assert "with ids" in repr(small)


def test_ids_and_positions_do_not_mix_and_bad_ids_are_refused(data):
    x, _ = data
    index = with_ids(x[:300], np.arange(300))
    with pytest.raises(ValueError, match="holds 300 vectors added with ids .*add without ids"):
        index.add(x[:5])
    with pytest.raises(ValueError, match="add_codes without ids"):
        index.add_codes(index.codes[:5])
    index.add_codes(index.codes[:5], ids=[900, 901, 902, 903, 904])
    assert index.ntotal == 305 and index.ids[-1] == 904
    plain = trained(x[:300])
    with pytest.raises(ValueError, match="added without ids .*add_with_ids with ids"):
        plain.add_with_ids(x[:2], [1, 2])
    for bad, error, message in [([1.0, 2.0], TypeError, "ids must be integers"),
                                ([True, False], TypeError, "ids must be integers"),
                                ([1], ValueError, r"shape \(2,\)"),
                                ([[1, 2]], ValueError, r"shape \(2,\)"),
                                ([3, -1], ValueError, "ids must be >= 0"),
                                (np.array([2**63, 1], np.uint64), ValueError, "fit in int64")]:
        with pytest.raises(error, match=message):
            index.add_with_ids(x[:2], bad)
    assert index.ntotal == 305  # nothing appended by a refused call
    index.reset()
    assert index.ids is None
    index.add(x[:3])  # an emptied index takes either kind
    assert index.ids is None and index.ntotal == 3


def test_remove_ids_removes_by_id_or_by_position_and_search_matches_a_fresh_index(data):
    x, q = data
    ids = np.arange(len(x), dtype=np.int64) * 10
    index = with_ids(x, ids)
    gone = ids[::3]
    assert index.remove_ids(np.concatenate([gone, [5, 10**9]])) == len(gone)  # unknown ids: not counted
    fresh = jpq.PQIndex(32, 8)
    fresh.centroids = index.centroids
    keep = np.setdiff1d(np.arange(len(x)), np.arange(len(x))[::3])
    fresh.add_with_ids(x[keep], ids[keep])
    for a, b in zip(index.search(q, 20), fresh.search(q, 20)):
        np.testing.assert_array_equal(a, b)
    assert not np.isin(index.search(q, 50)[1], gone).any()
    # without ids: positions, and the later ones shift down (as faiss' IndexFlatCodes)
    plain = trained(x[:300])
    codes = plain.codes.copy()
    assert plain.remove_ids(torch.tensor([0, 2, 299])) == 3
    np.testing.assert_array_equal(plain.codes, np.delete(codes, [0, 2, 299], axis=0))
    with pytest.raises(TypeError, match="1-d sequence of integers"):
        plain.remove_ids([0.5])
    assert plain.remove_ids([]) == 0


def test_reconstruct_takes_the_id(data):
    x, _ = data
    index = with_ids(x[:300], np.arange(300)[::-1] + 1000)
    np.testing.assert_array_equal(index.reconstruct(1299), index.decode(index.codes[:1])[0])
    np.testing.assert_array_equal(index.reconstruct(1000), index.decode(index.codes[299:])[0])
    with pytest.raises(IndexError, match="id 5 is not in the index"):
        index.reconstruct(5)
    # reconstruct_n takes ids too, as faiss' IndexIDMap2: ids 1000 .. 1001 are the last two rows
    np.testing.assert_array_equal(index.reconstruct_n(1000, 2), index.decode(index.codes[[299, 298]]))
    with pytest.raises(IndexError, match="id 999 is not in the index"):
        index.reconstruct_n(999, 2)
    with pytest.raises(ValueError, match="needs n"):
        index.reconstruct_n(1000)
    index.add_with_ids(x[1:2], [1299])  # a repeated id: the last one added, as faiss' IndexIDMap2
    np.testing.assert_array_equal(index.reconstruct(1299), index.decode(index.codes[300:])[0])
    np.testing.assert_allclose(index.to_faiss().reconstruct(1299), index.reconstruct(1299), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opq", [False, True])
def test_ids_save_load_and_faiss_round_trip(tmp_path, data, opq):
    x, q = data
    ids = np.random.default_rng(2).permutation(len(x)).astype(np.int64) * 1000 + 3
    index = with_ids(x, ids, opq=opq)
    D, I = index.search(q, 10)
    index.save(tmp_path / "ids.jpq")
    back = jpq.PQIndex.load(tmp_path / "ids.jpq")
    np.testing.assert_array_equal(back.ids, ids)
    np.testing.assert_array_equal(back.search(q, 10)[1], I)
    f = index.to_faiss()
    assert isinstance(f, faiss.IndexIDMap2)
    Df, If = f.search(q, 10)
    np.testing.assert_array_equal(If, I)
    np.testing.assert_allclose(Df, D, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f.reconstruct(int(ids[7])), index.reconstruct(int(ids[7])), rtol=1e-5, atol=1e-5)
    again = jpq.PQIndex.from_faiss(f)
    np.testing.assert_array_equal(again.ids, ids)
    np.testing.assert_array_equal(again.search(q, 10)[1], I)
    # an IndexIDMap that faiss built and filled
    built = faiss.IndexIDMap(faiss.IndexPQ(32, 8, 8, faiss.METRIC_INNER_PRODUCT))
    built.train(x)
    built.add_with_ids(x[:500], ids[:500])
    ours = jpq.PQIndex.from_faiss(built)
    np.testing.assert_array_equal(ours.ids, ids[:500])
    np.testing.assert_array_equal(ours.search(q, 10)[1], built.search(q, 10)[1])


def test_load_refuses_ids_that_do_not_fit_the_codes(tmp_path, data):
    x, _ = data
    for ids, message in [(np.arange(4, dtype=np.int64), r"ids must be an int64 array of shape \(5,\)"),
                         (np.array([0, 1, 2, 3, -4], np.int64), "ids must be >= 0"),
                         (np.arange(5, dtype=np.int32), "ids must be an int64 array")]:
        bad = with_ids(x[:300], np.arange(300))
        bad.codes, bad.ids = bad.codes[:5], ids
        bad.save(tmp_path / "bad.jpq")
        with pytest.raises(ValueError, match=message):
            jpq.PQIndex.load(tmp_path / "bad.jpq")


@pytest.mark.interpreter
def test_ids_map_the_device_search_too(data):
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    x, q = data
    index = jpq.PQIndex(32, 8, nbits=6)
    index.train(x[:400], niter=5)
    index.add_with_ids(x[:400], np.arange(400)[::-1] * 3 + 1)
    qt = torch.from_numpy(q[:4])
    D, rows = index._search_positions(q[:4], 405)
    Dt, rows_t = index._search_positions(qt, 405, backend="triton")
    scores = adc_scores_reference(build_lut_reference(q[:4], index.centroids, "ip"), index.codes)
    assert_topk_matches(Dt, rows_t, D, rows, scores, atol=1e-4)
    Dt_ids, It = index.search(qt, 405, backend="triton")
    torch.testing.assert_close(Dt_ids, Dt)
    expected = np.where(rows_t.numpy() >= 0, index.ids[np.maximum(rows_t.numpy(), 0)], -1)
    np.testing.assert_array_equal(It.numpy(), expected)
    assert (It[:, 400:] == -1).all()


def test_an_index_with_ids_but_no_vectors_pads_and_the_ids_are_the_index_own(data):
    x, q = data
    caller_ids = np.arange(300) + 1000
    index = with_ids(x[:300], caller_ids)
    _, I = index.search(q[:2], 5)
    caller_ids += 5  # the index copied them, as faiss does
    np.testing.assert_array_equal(index.search(q[:2], 5)[1], I)
    tensor_ids = torch.arange(3) + 7
    index.add_codes(index.codes[:3], ids=tensor_ids)
    tensor_ids[0] = 0
    np.testing.assert_array_equal(index.ids[-3:], [7, 8, 9])
    assert index.remove_ids(index.ids.copy()) == 303 and index.ntotal == 0
    for queries in (q[:2], torch.from_numpy(q[:2])):
        D, I = index.search(queries, 4)  # ids left but no vector: all padding, as faiss
        assert (np.asarray(I) == -1).all() and D.shape == (2, 4)
    index.add_with_ids(x[:0], np.zeros(0, np.int64))
    assert (index.search(q[:2], 3)[1] == -1).all()


@pytest.mark.parametrize("opq", [False, True])
def test_from_faiss_of_a_temporary_index_copies_before_it_is_freed(tmp_path, data, opq):
    """from_faiss(faiss.read_index(path)): the wrapper owns the indexes inside it, so it must stay
    alive until everything is copied out (a freed OPQ wrapper gave garbage shapes or a segfault)."""
    x, q = data
    index = with_ids(x, np.arange(len(x)) * 3 + 1, opq=opq)
    faiss.write_index(index.to_faiss(), str(tmp_path / "f.index"))
    plain = trained(x, opq=opq)
    faiss.write_index(plain.to_faiss(), str(tmp_path / "p.index"))
    for _ in range(3):
        back = jpq.PQIndex.from_faiss(faiss.read_index(str(tmp_path / "f.index")))
        np.testing.assert_array_equal(back.codes, index.codes)
        np.testing.assert_array_equal(back.ids, index.ids)
        np.testing.assert_array_equal(back.centroids, index.centroids)
        again = jpq.PQIndex.from_faiss(faiss.read_index(str(tmp_path / "p.index")))
        np.testing.assert_array_equal(again.codes, plain.codes)
        if opq:
            np.testing.assert_array_equal(again.rotation, plain.rotation)


@pytest.mark.parametrize("opq", [False, True])
def test_reconstruct_batch_and_reconstruct_n_match_faiss(data, opq):
    x, _ = data
    ids = np.random.default_rng(3).permutation(400).astype(np.int64) + 50
    index = with_ids(x[:400], ids, opq=opq)
    f = index.to_faiss()
    keys = np.array([ids[5], ids[0], ids[399], ids[5]], np.int64)  # any order, repeats allowed
    np.testing.assert_allclose(index.reconstruct_batch(keys), f.reconstruct_batch(keys), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(index.reconstruct_batch(torch.from_numpy(keys)), index.reconstruct_batch(keys))
    np.testing.assert_allclose(index.reconstruct_n(60, 30), f.reconstruct_n(60, 30), rtol=1e-5, atol=1e-5)
    assert index.reconstruct_batch(np.zeros(0, np.int64)).shape == (0, 32)
    assert index.reconstruct_n(60, 0).shape == (0, 32)
    for bad, error, message in [([ids[0], 7], IndexError, "id 7 is not in the index"),
                                ([0.5], TypeError, "keys must be a 1-d sequence of integers"),
                                ([[ids[0]]], TypeError, "keys must be a 1-d sequence of integers"),
                                (np.array([2**63], np.uint64), IndexError, "not in the index")]:
        with pytest.raises(error, match=message):
            index.reconstruct_batch(bad)
    with pytest.raises(ValueError, match="n must be >= 0"):
        index.reconstruct_n(60, -1)
    for i0, n in [(2**63 - 2, 3), (2**63 - 1, 2), (0, 10**12), (-1, 2)]:  # refused before any allocation
        with pytest.raises(IndexError, match="not all in the index"):
            index.reconstruct_n(i0, n)
    for key in (2**63, -(2**63) - 1, np.uint64(2**63)):
        with pytest.raises(IndexError, match="not in the index"):
            index.reconstruct(key)
    plain = trained(x[:300], opq=opq)
    fp = plain.to_faiss()
    rows = np.array([299, 0, 17], np.int64)
    np.testing.assert_allclose(plain.reconstruct_batch(rows), fp.reconstruct_batch(rows), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="id 300 out of range"):
        plain.reconstruct_batch([300])
    with pytest.raises(IndexError, match="id -1 out of range"):
        plain.reconstruct_batch([-1])
    with pytest.raises(IndexError, match="out of range"):
        plain.reconstruct(2**64)


def faiss_selectors(ids):
    """(name, faiss IDSelector) pairs over `ids`, each kept alive with the arrays it points to."""
    batch = ids[::4].copy()
    bits = np.zeros(int(np.median(ids)) + 1, np.uint8)  # a bitmap over the lower half of the ids
    bits[ids[ids <= np.median(ids)][::3]] = 1
    bitmap = np.packbits(bits, bitorder="little")
    empty = np.zeros(0, np.int64)
    return [("range", faiss.IDSelectorRange(int(ids.min()) + 20, int(ids.min()) + 90)),
            ("batch", faiss.IDSelectorBatch(batch)),
            ("array", faiss.IDSelectorArray(batch)),
            ("bitmap", faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))),
            ("not range", faiss.IDSelectorNot(faiss.IDSelectorRange(0, int(np.median(ids))))),
            ("or", faiss.IDSelectorOr(faiss.IDSelectorArray(batch[:5]), faiss.IDSelectorRange(0, 40))),
            ("empty array", faiss.IDSelectorArray(empty)),
            ("empty range", faiss.IDSelectorRange(-5, -5))], (batch, bitmap, empty)


@pytest.mark.parametrize("with_ids_map", [True, False])
def test_remove_ids_takes_a_faiss_selector_as_faiss_does(data, with_ids_map):
    x, q = data
    ids = np.random.default_rng(4).permutation(300).astype(np.int64) * 2 + 10
    ids[7] = ids[8]  # a repeated id goes with its twin
    selectors, _keep_alive = faiss_selectors(ids if with_ids_map else np.arange(300, dtype=np.int64))
    for name, selector in selectors:
        index = with_ids(x[:300], ids) if with_ids_map else trained(x[:300])
        f = index.to_faiss()
        removed = index.remove_ids(selector)
        assert removed == f.remove_ids(selector), name
        assert index.ntotal == f.ntotal == 300 - removed, name
        if with_ids_map:
            np.testing.assert_array_equal(index.ids, faiss.vector_to_array(f.id_map))
        D, I = index.search(q, 10)
        Df, If = f.search(q, 10)
        np.testing.assert_array_equal(I, If, err_msg=name)
        np.testing.assert_allclose(D, Df, rtol=1e-4, atol=1e-4)
    assert removed == 0  # the empty range
    with pytest.raises(TypeError, match="or a faiss IDSelector"):
        trained(x[:300]).remove_ids("0")


def test_remove_ids_ignores_unsigned_ids_past_int64(data):
    x, _ = data
    index = with_ids(x[:300], np.arange(300))
    assert index.remove_ids(np.array([2**64 - 1, 3], np.uint64)) == 1
    assert 3 not in index.ids and index.ntotal == 299


def radius_in_a_gap(scores: np.ndarray, rank: int) -> float:
    """A radius between two distinct scores near the `rank`-th of all, away from both by more than
    float32 rounding: results then cannot depend on summation order."""
    flat = np.unique(scores.ravel())
    gaps = np.diff(flat)
    at = rank + int(np.argmax(gaps[rank : rank + 200] > 1e-3))
    return float((flat[at] + flat[at + 1]) / 2)


def assert_range_results_equal(got, want, rtol=1e-5, atol=1e-5):
    lims, D, I = (np.asarray(a) for a in got)
    flims, fD, fI = want
    np.testing.assert_array_equal(lims, flims)
    np.testing.assert_array_equal(I, fI)
    np.testing.assert_allclose(D, fD, rtol=rtol, atol=atol)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("opq", [False, True])
def test_range_search_matches_faiss(data, metric, opq):
    x, q = data
    index = trained(x, metric=metric, opq=opq)
    scores = adc_scores_reference(index.lut(q, backend="reference"), index.codes)
    for rank in (0, 500, len(x) * len(q) // 3):  # from one result to a third of everything
        r = radius_in_a_gap(-scores if metric == "ip" else scores, rank)
        r = -r if metric == "ip" else r
        result = index.range_search(q, r)
        assert_range_results_equal(result, index.to_faiss().range_search(q, r))
        lims, D, I = result
        assert lims.dtype == np.int64 and I.dtype == np.int64 and D.dtype == np.float32
        for i in range(len(q)):  # query i's results: its vectors within r, in index order
            want = np.nonzero(scores[i] > r if metric == "ip" else scores[i] < r)[0]
            np.testing.assert_array_equal(I[lims[i] : lims[i + 1]], want)
        assert_range_results_equal(index.range_search(q, r, backend="reference"), result)


def test_range_search_with_ids_blocks_torch_and_edges(data, monkeypatch):
    x, q = data
    ids = np.random.default_rng(8).permutation(len(x)).astype(np.int64) * 7 + 3
    index = with_ids(x, ids)
    scores = adc_scores_reference(index.lut(q), index.codes)
    r = -radius_in_a_gap(-scores, 2000)
    whole = index.range_search(q, r)
    assert_range_results_equal(whole, index.to_faiss().range_search(q, r))
    monkeypatch.setattr(jpq.PQIndex, "RANGE_BLOCK_SCORES", 7 * len(q))  # blocks of 7 documents
    assert_range_results_equal(index.range_search(q, r), whole)
    lims_t, D_t, I_t = index.range_search(torch.from_numpy(q), r)
    assert all(isinstance(a, torch.Tensor) for a in (lims_t, D_t, I_t))
    assert_range_results_equal((lims_t, D_t, I_t), whole)  # per-query tables here: float32 rounding
    lims, D, I = index.range_search(q, float(scores.max()) + 1)  # nothing within
    assert (lims == 0).all() and D.shape == I.shape == (0,)
    lims, _, I = index.range_search(q, -np.inf)  # everything
    np.testing.assert_array_equal(lims, np.arange(len(q) + 1) * len(x))
    np.testing.assert_array_equal(I[: len(x)], ids)
    lims, D, I = index.range_search(q[:0], r)
    assert lims.tolist() == [0] and len(I) == 0
    empty = jpq.PQIndex(32, 8)
    empty.centroids = index.centroids
    lims, D, I = empty.range_search(q, r)
    assert (lims == 0).all() and len(D) == 0
    for bad, error in [(True, TypeError), ("1", TypeError), (float("nan"), ValueError), (np.array([1.0]), TypeError)]:
        with pytest.raises(error, match="radius"):
            index.range_search(q, bad)
    for same in (np.float32(r), np.array(r), torch.tensor(r, dtype=torch.float64)):  # 0-d radii
        assert_range_results_equal(index.range_search(q, same), whole)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from the float32 comparison
        assert index.range_search(q, 1e40)[0][-1] == 0
        assert index.range_search(q, -1e40)[0][-1] == len(q) * len(x)
    monkeypatch.setattr(jpq.PQIndex, "RANGE_BLOCK_SCORES", 8 * 256 * 3)  # 3 queries' tables per chunk
    assert_range_results_equal(index.range_search(q, r), whole)
    with pytest.raises(ValueError, match="backend"):
        index.range_search(q, r, backend="gpu")
    with pytest.raises(RuntimeError, match="not trained"):
        jpq.PQIndex(32, 8).range_search(q, r)


def test_range_search_of_a_unit_norm_index_scores_the_rescaled_reconstructions(data):
    x, q = data
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    index = jpq.PQIndex(32, 8, unit_norm=True)
    index.train(xn, niter=8)
    index.add(xn)
    rec = index.decode(index.codes)  # already rescaled to unit norm
    scores = q.astype(np.float64) @ rec.T.astype(np.float64)
    r = -radius_in_a_gap(-scores, 300)
    lims, D, I = index.range_search(q, r)
    for i in range(len(q)):
        np.testing.assert_array_equal(I[lims[i] : lims[i + 1]], np.nonzero(scores[i] > r)[0])
    np.testing.assert_allclose(D, np.concatenate([scores[i][scores[i] > r] for i in range(len(q))]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_range_search_on_the_device_matches_the_cpu(data):
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    x, q = data
    index = with_ids(x[:400], np.arange(400)[::-1] + 10)
    scores = adc_scores_reference(index.lut(q[:3]), index.codes)
    r = -radius_in_a_gap(-scores, 100)
    lims, D, I = index.range_search(torch.from_numpy(q[:3]), r, backend="triton")
    assert all(isinstance(a, torch.Tensor) for a in (lims, D, I))
    assert_range_results_equal((lims, D, I), index.range_search(q[:3], r))
    # NumPy queries with backend "triton": the kernel scores them too (off the interpreter
    # adc_scores refuses them, as search does), not silently the CPU path
    assert_range_results_equal(index.range_search(q[:3], r, backend="triton"), index.range_search(q[:3], r))


@pytest.mark.parametrize("opq", [False, True])
def test_search_and_reconstruct_and_assign_match_faiss(data, opq):
    x, q = data
    index = trained(x[:300], opq=opq)
    f = index.to_faiss()
    D, I, R = index.search_and_reconstruct(q, 305)  # k > ntotal: NaN rows where I is -1
    Df, If, Rf = f.search_and_reconstruct(q, 305)
    np.testing.assert_array_equal(I, If)
    np.testing.assert_allclose(D, Df, rtol=1e-4, atol=1e-4)
    assert R.shape == (len(q), 305, 32) and R.dtype == np.float32
    assert np.isnan(R[:, 300:]).all() and np.isnan(Rf[:, 300:]).all()
    np.testing.assert_allclose(R[:, :300], Rf[:, :300], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(R[0, 0], index.reconstruct(int(I[0, 0])), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(index.assign(q, 3), I[:, :3])
    np.testing.assert_array_equal(index.assign(q)[:, 0], f.assign(q, 1)[:, 0])
    ids = np.arange(300, dtype=np.int64)[::-1] * 11 + 5
    with_map = with_ids(x[:300], ids, opq=opq)
    Dt, It, Rt = with_map.search_and_reconstruct(torch.from_numpy(q), 7)
    assert isinstance(Rt, torch.Tensor) and isinstance(It, torch.Tensor)
    np.testing.assert_allclose(Rt.numpy(), with_map.reconstruct_batch(It.numpy().ravel()).reshape(len(q), 7, 32),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(It.numpy(), with_map.search(q, 7)[1])


def test_merge_from_moves_the_codes_as_faiss_and_refuses_other_quantizers(data):
    x, q = data
    a = trained(x[:1000])
    b = jpq.PQIndex(32, 8)
    b.centroids = a.centroids.copy()  # the same quantizer, trained once (equal arrays suffice)
    b.add(x[1000:1500])
    fa, fb = a.to_faiss(), b.to_faiss()
    a.merge_from(b)
    fa.merge_from(fb)
    assert a.ntotal == fa.ntotal == 1500 and b.ntotal == fb.ntotal == 0
    for mine, theirs in zip(a.search(q, 20), fa.search(q, 20)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
    whole = trained(x[:1000])
    whole.add(x[1000:1500])
    np.testing.assert_array_equal(a.codes, whole.codes)
    # ids: the other's ids, shifted by add_id
    c = with_ids(x[:300], np.arange(300))
    d = jpq.PQIndex(32, 8)
    d.centroids = c.centroids
    d.add_with_ids(x[300:400], np.arange(100))
    c.merge_from(d, add_id=1000)
    np.testing.assert_array_equal(c.ids[300:], np.arange(100) + 1000)
    assert d.ntotal == 0 and d.ids is None
    e = jpq.PQIndex(32, 8)
    e.centroids = c.centroids
    e.add(x[:5])
    for other, kwargs, error, message in [
            (e, {}, ValueError, "mix positions and ids"),
            (e, {"add_id": 3}, ValueError, "add_id must be 0"),
            (trained(x[:400], opq=True), {}, ValueError, "opq differs"),
            (jpq.PQIndex(32, 4), {}, ValueError, "M differs|not trained"),
            (trained(x[500:900]), {}, ValueError, "centroids differ"),
            (c, {}, ValueError, "into itself"),
            (c.to_faiss(), {}, TypeError, "must be a PQIndex")]:
        with pytest.raises(error, match=message):
            c.merge_from(other, **kwargs)
    assert c.ntotal == 400 and e.ntotal == 5  # nothing moved by a refused merge
    f = jpq.PQIndex(32, 8)
    f.centroids = c.centroids
    f.add_with_ids(x[:10], np.arange(10) + 2**62)
    with pytest.raises(ValueError, match="out of"):
        c.merge_from(f, add_id=2**62)


@pytest.mark.parametrize("ids_map", [True, False])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_with_a_selector_is_the_search_of_the_selected_vectors(data, ids_map, metric):
    """params.sel restricts search to the selected ids: the same results as an index holding only
    those vectors (same codes), and as faiss' IndexIDMap2 over a flat index of the reconstructions."""
    x, q = data
    ids = (np.random.default_rng(9).permutation(len(x)).astype(np.int64) * 5 + 2) if ids_map else None
    index = with_ids(x, ids, metric=metric) if ids_map else trained(x, metric=metric)
    keys = ids if ids_map else np.arange(len(x), dtype=np.int64)
    batch = keys[np.random.default_rng(10).choice(len(x), 700, replace=False)]
    for name, sel, chosen in [("batch", faiss.IDSelectorBatch(batch), np.isin(keys, batch)),
                              ("range", faiss.IDSelectorRange(100, 1500), (keys >= 100) & (keys < 1500)),
                              ("few", faiss.IDSelectorArray(batch[:6]), np.isin(keys, batch[:6]))]:
        params = faiss.SearchParameters(sel=sel)
        D, I = index.search(q, 10, params=params)
        subset = jpq.PQIndex(32, 8, metric=metric)
        subset.centroids = index.centroids
        subset.add_codes(index.codes[chosen], ids=keys[chosen])
        D0, I0 = subset.search(q, 10)
        np.testing.assert_array_equal(I, I0, err_msg=name)
        np.testing.assert_array_equal(D, D0)
        assert np.isin(I[I >= 0], keys[chosen]).all()
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(32) if metric == "ip" else faiss.IndexFlatL2(32))
        flat.add_with_ids(index.decode(index.codes), keys)
        Df, If = flat.search(q, 10, params=faiss.SearchParameters(sel=sel))
        np.testing.assert_allclose(D, Df, rtol=1e-4, atol=1e-3)
        assert (I == If).mean() > 0.97, name  # near-ties may order differently
    if not ids_map:
        assert (index.search(q, 8, params=faiss.SearchParameters(sel=faiss.IDSelectorArray(np.array([3, 1]))))[1][:, 2:]
                == -1).all()  # fewer selected than k: -1 padding
    D, I = index.search(q, 4, params=faiss.SearchParameters(sel=faiss.IDSelectorRange(-9, -8)))  # none selected
    assert (I == -1).all()
    for same in (None, faiss.SearchParameters()):  # no selector: the plain search
        np.testing.assert_array_equal(index.search(q, 5, params=same)[1], index.search(q, 5)[1])
    with pytest.raises(TypeError, match="SearchParameters"):
        index.search(q, 5, params=3)
    Dt, It = index.search(torch.from_numpy(q), 10, params=faiss.SearchParameters(sel=faiss.IDSelectorBatch(batch)))
    assert isinstance(It, torch.Tensor)
    np.testing.assert_array_equal(It.numpy(), index.search(q, 10, params=faiss.SearchParameters(
        sel=faiss.IDSelectorBatch(batch)))[1])


@pytest.mark.interpreter
def test_search_with_a_selector_on_the_device_matches_the_cpu(data):
    from jpq.kernels.arrays import is_interpreter
    from jpq.kernels.dispatch import triton_importable

    if not (triton_importable() and is_interpreter()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    x, q = data
    index = with_ids(x[:400], np.arange(400)[::-1] * 3 + 1)
    for sel in (faiss.IDSelectorRange(100, 700), faiss.IDSelectorRange(-2, -1)):
        params = faiss.SearchParameters(sel=sel)
        Dt, It = index.search(torch.from_numpy(q[:3]), 12, backend="triton", params=params)
        D, I = index.search(q[:3], 12, params=params)
        np.testing.assert_array_equal(It.numpy(), I)
        np.testing.assert_allclose(Dt.numpy(), D, rtol=1e-5, atol=1e-4)


def test_a_selector_in_search_params_is_read_as_the_typed_selector(data, monkeypatch):
    """faiss returns params.sel as a base IDSelector: Range / Array / Bitmap must still take their
    array paths, not faiss's per-id loop (an IDSelectorArray is a linear scan per id there)."""
    x, q = data
    index = trained(x)
    expected = {}
    for name, sel in [("range", faiss.IDSelectorRange(10, 900)), ("array", faiss.IDSelectorArray(np.arange(0, 3000, 7)))]:
        expected[name] = index.search(q, 10, params=faiss.SearchParameters(sel=sel))
    monkeypatch.setattr(faiss, "IndexIDMap", None)  # the generic path would call it
    for name, sel in [("range", faiss.IDSelectorRange(10, 900)), ("array", faiss.IDSelectorArray(np.arange(0, 3000, 7)))]:
        params = faiss.SearchParameters(sel=sel)
        for got, want in zip(index.search(q, 10, params=params), expected[name]):
            np.testing.assert_array_equal(got, want)
        Ds, Is, R = index.search_and_reconstruct(q, 10, params=params)
        np.testing.assert_array_equal(Is, expected[name][1])
        np.testing.assert_array_equal(index.assign(q, 10, params=params), expected[name][1])


def test_reset_and_merge_free_the_emptied_index_caches(data):
    x, q = data
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = jpq.PQIndex(32, 8, unit_norm=True)
    a.train(xn, niter=5)
    b = jpq.PQIndex(32, 8, unit_norm=True)
    b.centroids = a.centroids
    b.add_with_ids(xn[:500], np.arange(500))
    b.search(q, 3)
    b.reconstruct(7)
    b._device_arrays(torch.device("cpu"))
    a.add_with_ids(xn[500:600], np.arange(100) + 1000)
    a.merge_from(b)
    assert b.ntotal == 0 and b._unit_scale_cache is None and b._id_rows is None
    assert getattr(b, "_device_cache", None) is None
    with pytest.raises(ValueError, match="add_id must fit in int64"):
        a.merge_from(b, add_id=2**70)


def test_pickle_and_copy_carry_no_cache(data):
    import copy
    import pickle

    x, q = data
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    index = jpq.PQIndex(32, 8, unit_norm=True)
    index.train(xn, niter=5)
    index.add_with_ids(xn, np.arange(len(x)) * 2)
    D, I = index.search(q, 10)
    index.reconstruct(4)
    index._device_arrays(torch.device("cpu"))
    for twin in (pickle.loads(pickle.dumps(index)), copy.deepcopy(index)):
        assert not set(jpq.PQIndex._CACHES) & set(vars(twin))
        assert not any(isinstance(v, torch.Tensor) for v in vars(twin).values())
        D2, I2 = twin.search(q, 10)
        np.testing.assert_array_equal(I2, I)
        np.testing.assert_array_equal(D2, D)
        np.testing.assert_array_equal(twin.reconstruct(4), index.reconstruct(4))
    assert index._device_cache is not None  # the original keeps its own
