"""Assertions shared by the CLI tests."""

from __future__ import annotations


def assert_clean_failure(result, out_dir, *needles):
    """Exit code 2, one line on stderr naming `needles`, no traceback, nothing (half-)written."""
    code, stdout, stderr = result
    assert code == 2, (code, stdout, stderr)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in stderr, stderr
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.tmp-*")), "half-written directory left behind"
