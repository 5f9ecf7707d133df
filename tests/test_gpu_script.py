"""benchmarks/gpu.py, the one GPU command: without a CUDA device it measures nothing and says so."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script measures; run it directly")
def test_without_cuda_it_exits_cleanly_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu.py", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout
    assert not any(tmp_path.iterdir())


def test_it_documents_its_command_line():
    result = subprocess.run([sys.executable, "benchmarks/gpu.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "--skip-install" in result.stdout
