"""Shared fixtures: tiny models per family (session-scoped) and an in-process CLI runner."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_model  # noqa: E402

# Tiny models run far faster on one thread than on two contended ones (and CI has 2 cores).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Save (once per session) a tiny model of a family to disk; returns its directory."""
    cache: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in cache:
            path = tmp_path_factory.mktemp(model_type)
            tiny_model(model_type).save_pretrained(path)
            cache[model_type] = path
        return cache[model_type]

    return make


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``moeprune ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from moeprune.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what fixtures printed before the command
        monkeypatch.setattr(sys, "argv", ["moeprune", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(family, layout): checkpoint dir}, written in small shards (per-expert 'hub' or 'fused')."""
    cache: dict = {}

    def make(family: str, layout: str = "hub") -> Path:
        if (family, layout) not in cache:
            path = tmp_path_factory.mktemp(f"{family}-{layout}")
            tiny_model(family).save_pretrained(
                path, max_shard_size="20KB", save_original_format=layout == "hub"
            )
            cache[family, layout] = path
        return cache[family, layout]

    return make
