"""The README's Python blocks run as written (at a smaller corpus size, so the file takes seconds):
an API example that drifted from the code fails here."""
import re

import pytest

from conftest import REPO_ROOT

pytest.importorskip("faiss")


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2, "the README's API blocks are gone"
    code = "\n".join(blocks)
    size = "standard_normal((100_000, 768))"
    assert size in code, "the API block's corpus size changed: update this test"
    code = code.replace(size, "standard_normal((3_000, 768))").replace("xb[:20_000]", "xb[:2_000]")
    monkeypatch.chdir(tmp_path)  # index.save("docs.jpq") writes here
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "docs.jpq").exists()
    assert namespace["index"].ntotal == 3_000 - 1_000
    assert namespace["x0"].shape == (768,)
