"""The GPU check script's check section runs here, at tiny shapes, so it cannot rot unseen
between the rare GPU runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.kernels.helpers import require_triton

require_triton()

SCRIPT = Path(__file__).resolve().parents[2] / "loadtests" / "gpu_kernels_check.py"


def test_smoke_run_passes(monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    spec = importlib.util.spec_from_file_location("gpu_kernels_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_kernels_check", module)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--seed", "3"]) == 0
    assert "checks: 20/20 PASS" in capsys.readouterr().out
