"""The documentation stays true to the repository: README.md is a front page (<= 250 lines), every
relative link in README.md and docs/*.md resolves, every `moeprune CMD --flag` they show is a flag
of that command, and every recipe they show passes the recipe validator."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(lang: str) -> list[tuple[str, str]]:
    return [
        (_name(p), m.group(2)) for p in PAGES for m in FENCE.finditer(p.read_text()) if m.group(1) == lang
    ]


def test_front_page_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text())  # links inside code blocks are examples, not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{_name(page)}: links to missing files or headings: {broken}"


def _cli_options() -> dict[str, set[str]]:
    import typer.main

    from moeprune.cli import app

    group = typer.main.get_command(app)
    return {
        name: {opt for param in cmd.params for opt in getattr(param, "opts", []) if opt.startswith("--")}
        for name, cmd in group.commands.items()
    }


def test_cli_examples_use_real_commands_and_flags():
    options = _cli_options()
    bad = []
    for page, block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            m = re.match(r"\s*moeprune\s+([a-z-]+)(.*)", line)
            if not m:
                continue
            cmd, rest = m.groups()
            if cmd not in options:
                bad.append(f"{page}: unknown command 'moeprune {cmd}'")
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
                if flag not in options[cmd] | {"--help"}:
                    bad.append(f"{page}: 'moeprune {cmd}' has no {flag}")
    assert not bad, "\n".join(bad)


def test_recipe_examples_are_valid(tmp_path):
    from moeprune.recipe import Recipe

    recipes = [(page, block) for page, block in _blocks("yaml") if re.search(r"^model:", block, re.M)]
    assert recipes, "the docs show no recipe"
    for i, (page, block) in enumerate(recipes):
        path = tmp_path / f"recipe{i}.yaml"
        path.write_text(block)
        assert isinstance(yaml.safe_load(block), dict), page
        Recipe.from_yaml(path)  # raises MoepruneError naming the key when the example is wrong
