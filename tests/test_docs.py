"""README.md is the front door and docs/ holds the topic pages: every relative link and every `docs/...` path the
pages mention exists, the README stays short, and docs/index.md lists every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300

LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)")  # [text](target) and ![alt](target)
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w.-][\w./-]*")  # docs/gpu.md, docs/window_ppl_nll.png


def name(page: Path) -> str:
    return str(page.relative_to(REPO))


def link_targets(text: str) -> list[str]:
    """The relative link targets of a page, without `#anchor` suffixes (web links and pure anchors left out)."""
    targets = (m.group(1) for m in LINK.finditer(text))
    return [t.split("#")[0] for t in targets if not t.startswith(("http://", "https://", "#", "mailto:"))]


def docs_paths(text: str) -> list[str]:
    """Every `docs/<something>` path a page mentions, in code or in prose, less any sentence's end."""
    return [m.group(0).rstrip(".") for m in DOCS_PATH.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_exist(page):
    broken = [t for t in link_targets(page.read_text()) if not (page.parent / t).exists()]
    assert not broken, f"{name(page)} links to missing files: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_mentioned_docs_paths_exist(page):
    missing = [p for p in docs_paths(page.read_text()) if not (REPO / p).exists()]
    assert not missing, f"{name(page)} mentions missing paths: {missing}"


def test_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"


def test_index_links_every_page():
    index = REPO / "docs" / "index.md"
    linked = {(index.parent / t).resolve() for t in link_targets(index.read_text())}
    unlisted = [name(p) for p in PAGES[1:] if p != index and p.resolve() not in linked]
    assert not unlisted, f"docs/index.md does not link: {unlisted}"


def test_the_checks_find_what_they_look_for():
    text = "See [a](gpu.md#top), ![b](docs/x.png), [c](https://e.org/y.md), [d](#z); `docs/gpu.md`, docs/lm_study.md."
    assert link_targets(text) == ["gpu.md", "docs/x.png"]
    assert docs_paths(text) == ["docs/x.png", "docs/gpu.md", "docs/lm_study.md"]
