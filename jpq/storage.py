"""Files that are never left half-written, and the versioned, checksummed array container that
PQIndex and TreeIndex save to."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_write(path, suffix: str = ""):
    """Yield a binary file in `path`'s folder; on success it is fsync'ed and renamed over `path`,
    on any failure it is removed and `path` keeps its old content."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(payload, path) -> None:
    import torch

    with atomic_write(path, ".pt") as f:  # a file object: torch's writer rejects some temp names
        torch.save(payload, f)


def atomic_write_json(path, obj) -> None:
    with atomic_write(path, ".json") as f:
        f.write(json.dumps(obj, indent=1, default=float).encode())


def write_container(path, magic: bytes, fmt: str, version: int, params: dict, arrays: dict) -> None:
    """Layout: `magic`, uint32 header length, JSON header (format, version, params, array table,
    payload size and sha256), then the raw little-endian arrays. Written atomically."""
    payload = io.BytesIO()
    table = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        table[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": payload.tell(), "nbytes": a.nbytes}
        payload.write(a.tobytes())
    body = payload.getvalue()
    header = json.dumps({"format": fmt, "version": version, **params, "arrays": table,
                         "payload_nbytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
    with atomic_write(path, ".jpq") as f:
        f.write(magic)
        f.write(len(header).to_bytes(4, "little"))
        f.write(header)
        f.write(body)


def read_container(path, magic: bytes, fmt: str, version: int, what: str, required: tuple[str, ...] = ()):
    """Read a `write_container` file -> (header dict, {name: array}). A foreign (`what` names the
    expected kind in the message), truncated or corrupted file, or a header without the `required`
    parameters, raises ValueError (the checksum covers the payload, not the header)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    if blob[: len(magic)] != magic:
        raise ValueError(f"{path} is not a {what} file (bad magic bytes)")
    pos = len(magic)
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
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupted header: a JSON object expected, got {type(header).__name__}")
    if header.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt} file (format {header.get('format')!r})")
    if header.get("version") != version:
        raise ValueError(f"{path} has format version {header.get('version')}; this jpq reads version {version}")
    missing = [k for k in ("payload_nbytes", "sha256", "arrays", *required) if k not in header]
    if missing:
        raise ValueError(f"{path} has a corrupted header: missing {', '.join(missing)}")
    body = blob[pos + hlen :]
    if len(body) != header["payload_nbytes"]:
        raise ValueError(f"{path} is truncated: payload has {len(body)} of {header['payload_nbytes']} bytes")
    if hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise ValueError(f"{path} is corrupted: sha256 checksum mismatch")
    arrays = {}
    try:
        for name, spec in header["arrays"].items():
            arrays[name] = np.frombuffer(body, dtype=np.dtype(spec["dtype"]), count=int(np.prod(spec["shape"])),
                                         offset=spec["offset"]).reshape(spec["shape"]).copy()
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} has a corrupted array table: {type(e).__name__}: {e}") from None
    return header, arrays
