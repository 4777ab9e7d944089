"""The CLI's process settings: torch's OpenMP threads wait passively (benchmarks/results/threads.txt:
two spinning threads ran 6.2-7.4x one thread's wall time on a busy 2-core machine), unless the user
chose."""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_cli_module_loads_without_torch():
    # OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the CLI sets it before any import of torch
    code = "import sys, moeprune.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_passive_wait_unless_the_user_chose(run_cli, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    code, out, _ = run_cli("families")
    assert code == 0 and out
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert run_cli("families")[0] == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
