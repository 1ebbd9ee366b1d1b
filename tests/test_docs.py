"""The README a newcomer reads and the docs pages behind it: the README fits a few screens, every relative
link and ``#anchor`` resolves, every command has a page linked from the README's command table, and no
docs page is orphaned. Markdown only: no models, no data."""

from __future__ import annotations

import re
from pathlib import Path

import click

from posequant.cli import main

from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
DOCS_INDEX = DOCS / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MAX_README_LINES = 280

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title"), images too
SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto: ... (not checked here)


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """The lines outside fenced code blocks, and the lines inside them."""
    outside, inside, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        else:
            (inside if fenced else outside).append(line)
    return outside, inside


def prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans blanked (a link inside code is not a link)."""
    return re.sub(r"`[^`]*`", "code", "\n".join(split_fences(text)[0]))


def fenced_lines(text: str) -> list[str]:
    return split_fences(text)[1]


def links(text: str) -> list[str]:
    return LINK.findall(prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    if path.suffix != ".md":
        return set()
    seen: dict[str, int] = {}
    out = set()
    for line in split_fences(path.read_text())[0]:
        line = line.replace("`", "")  # a heading's code keeps its words
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def resolve(page: Path, target: str) -> tuple[Path, str]:
    """A relative link's file (the page itself for ``#anchor``) and its anchor ("" when none)."""
    path, _, anchor = target.partition("#")
    return ((page.parent / path).resolve() if path else page), anchor


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def test_the_markdown_helpers_see_what_github_sees():
    """The checks below can fail: slugs as GitHub makes them, links outside code only."""
    assert slug("How the defaults were chosen (measured, scripts/bench_quantize.py)") == \
        "how-the-defaults-were-chosen-measured-scriptsbench_quantizepy"
    assert slug("posequant eval and eval-preds") == "posequant-eval-and-eval-preds"
    assert "posequant-eval-and-eval-preds" in anchors(DOCS / "eval.md")
    assert not any(a.startswith("1-") for a in anchors(README))  # the tour's "# 1. ..." is a bash comment
    assert links("see [a](b.md#c) and `[not](a link)`\n```\n[nor](this)\n```\n") == ["b.md#c"]
    assert resolve(DOCS / "eval.md", "../README.md#tests") == (README, "tests")


def test_the_readme_fits_a_few_screens():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {MAX_README_LINES})"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in links(page.read_text()):
            if SCHEME.match(target):
                continue
            dest, anchor = resolve(page, target)
            if not dest.is_relative_to(REPO):
                broken.append(f"{_rel(page)}: {target} points outside the repository")
            elif not dest.exists():
                broken.append(f"{_rel(page)}: {target} (no file {_rel(dest)})")
            elif anchor and anchor not in anchors(dest):
                broken.append(f"{_rel(page)}: {target} (no heading #{anchor} in {_rel(dest)})")
    assert not broken, broken


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _command_paths(cmd, (*prefix, name))
        else:
            yield " ".join((*prefix, name))


def command_table() -> list[tuple[str, list[str]]]:
    """The README's command table (under "## Commands"): each row's command cell and its links."""
    section = README.read_text().split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"\|\s*`(posequant [^`]*)`\s*\|", line)
        if m:
            rows.append((m.group(1), links(line)))
    return rows


def test_every_command_has_a_docs_page_linked_from_the_readme_command_table():
    rows = command_table()
    missing = []
    for path in _command_paths(main):
        linked = [resolve(README, t) for cell, targets in rows for t in targets
                  if cell == f"posequant {path}" or cell.startswith(f"posequant {path} ")]
        pages = [dest for dest, _ in linked if dest.parent == DOCS and dest.exists()]
        # the page it links holds the command's synopsis
        if not any(line.startswith(f"posequant {path}") for p in pages for line in fenced_lines(p.read_text())):
            missing.append(path)
    assert len(rows) >= len(main.commands)
    assert not missing, f"commands without a docs page linked from README.md's command table: {missing}"


def test_no_docs_page_is_orphaned():
    linked = {resolve(index, t)[0] for index in (README, DOCS_INDEX) for t in links(index.read_text())}
    orphans = [_rel(p) for p in sorted(DOCS.glob("*.md")) if p not in linked]
    assert DOCS_INDEX in {resolve(README, t)[0] for t in links(README.read_text())}
    assert not orphans, f"docs pages linked from neither README.md nor docs/README.md: {orphans}"


def test_every_docs_page_opens_with_a_title_and_what_it_is():
    bad = []
    for page in sorted(DOCS.glob("*.md")):
        lines = page.read_text().splitlines()
        if len(lines) < 3 or not lines[0].startswith("# ") or lines[1] or not lines[2].strip() \
                or lines[2].startswith(("#", "|", "```", "-")):
            bad.append(_rel(page))
    assert not bad, f"docs pages that do not open with '# Title' and a sentence saying what they are: {bad}"
