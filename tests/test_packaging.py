"""The source folder kernels/ is the package jpq.kernels, never a top-level `kernels`.

Run from the repository root (`python -m jpq ...`, `python -m pytest`), the root is on sys.path
and the folder would shadow the PyPI package `kernels` that transformers imports: it hands such an
import over to the installed package, or fails naming jpq.kernels when there is none."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(code: str, *flags: str, env_path: str | None = None):
    env = {"PATH": "/usr/bin:/bin"}
    if env_path is not None:
        env["PYTHONPATH"] = env_path
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)


def test_a_top_level_kernels_import_from_the_root_gets_the_other_installed_package(tmp_path):
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MARK = 'the other kernels'\n")
    proc = run_in_root("import sys, kernels; print(sys.path[0] == '', kernels.MARK, kernels.__file__)", "-S",
                       env_path=str(tmp_path / "site"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("True the other kernels") and str(tmp_path) in proc.stdout


def test_without_another_kernels_package_the_import_fails_naming_jpq_kernels():
    proc = run_in_root("import kernels", "-S")  # -S: no site-packages, so no PyPI `kernels` either
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "jpq.kernels" in proc.stderr


def test_jpq_kernels_is_the_source_folder():
    import jpq.kernels

    assert Path(jpq.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert jpq.kernels.__name__ == "jpq.kernels" and callable(jpq.kernels.adc_topk)


def installed(distribution: str) -> bool:
    """Installed, by its metadata: an import that breaks must fail a test, not skip it."""
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not installed("sentence-transformers"), reason="sentence-transformers is not installed")
def test_sentence_transformers_imports_from_the_repository_root():
    proc = subprocess.run([sys.executable, "-c", "import sentence_transformers"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
