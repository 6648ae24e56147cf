"""bench/gpu.py runs on a GPU only now and then: its dry run (tiny sizes, Triton under the CPU
interpreter, every section and a short ADC sweep) keeps the script itself working in CI."""
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.interpreter
def test_gpu_script_dry_run_passes_every_check():
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--cpu-dry-run", "--no-save", "--sweep",
         "--sweep-budget", "2"],
        capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for section in ("adc_scores", "adc_topk", "assign", "ste fwd+bwd", "ste pairs fwd+bwd", "PQIndex.search",
                    "JPQTrainer step", "adc_topk 3 spans (torch ms: 1 span)", "adc_topk + adc_scores, N*M > 2**31",
                    "assign, n*D > 2**31", "PQIndex.search filtered (torch ms: unfiltered)"):
        assert f"| {section} |" in out, section
    assert "FAIL" not in out and "ERROR" not in out, out[-3000:]
    assert "ADC launch-configuration sweep" in out


@pytest.mark.interpreter
def test_gpu_profile_dry_run_prints_every_section():
    """bench/gpu_profile.py (the breakdown of the slow GPU paths) under the CPU interpreter."""
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_profile.py"), "--cpu-dry-run", "--no-save"],
        capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for heading in ("### 1. adc_topk", "### 2. One JPQTrainer step", "### 3. Fused straight-through op",
                    "### 4. adc_scores_triton tilings"):
        assert heading in out, heading
    assert "ERROR" not in out and "FAIL" not in out, out[-3000:]
    assert "| whole step, as the trainer runs it |" in out
