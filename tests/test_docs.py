"""The documentation's relative links resolve, and the README stays a front page.

Every relative Markdown link in ``README.md``, ``CHANGELOG.md`` and ``docs/*.md`` must point to a
file or folder of the repository, and a ``#anchor`` (in the same page or another Markdown page)
to a heading of that page, slugged the way GitHub renders headings. Links inside code blocks and
inline code are not links; ``http(s):``/``mailto:`` links are not checked (no network).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the README's first commands: CI runs the test command written there (.ci/run)
FIRST_COMMANDS = ("bash scripts/setup.sh && .venv/bin/lede demo", "bash scripts/test.sh")
README_MAX_LINES = 300

_FENCE = re.compile(r"^(```|~~~)")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
#: [text](target) and ![alt](target); the target up to whitespace or ')', an optional "title"
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files(root: Path = ROOT) -> list[Path]:
    """The Markdown pages whose links are checked: README.md, CHANGELOG.md and docs/*.md."""
    return [p for p in (root / "README.md", root / "CHANGELOG.md") if p.exists()] + sorted((root / "docs").glob("*.md"))


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code blanked out."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, _INLINE_CODE.sub("", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, every character that is not a
    letter, digit, space, hyphen or underscore removed, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").replace("*", "").lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown page (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            s = slug(m.group(2))
            k = seen.get(s, 0)
            seen[s] = k + 1
            out.add(s if k == 0 else f"{s}-{k}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of ``page`` that does not resolve, as ``"page:line: target (why)"``."""
    problems = []
    for n, line in _prose_lines(page.read_text(encoding="utf-8")):
        for target in _LINK.findall(line):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
                continue
            where = f"{page.relative_to(root)}:{n}: {target}"
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                problems.append(f"{where} (no such file)")
                continue
            try:
                dest.relative_to(root.resolve())
            except ValueError:
                problems.append(f"{where} (outside the repository)")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} (no heading with anchor #{anchor} in {dest.relative_to(root.resolve())})")
    return problems


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_checked_pages_exist():
    names = {str(p.relative_to(ROOT)) for p in doc_files()}
    assert {"README.md", "CHANGELOG.md"} <= names
    assert any(n.startswith("docs/") for n in names)


def test_readme_is_a_front_page_that_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    head = "\n".join(lines[:10])
    for command in FIRST_COMMANDS:
        assert command in head, f"README.md's first lines must keep `{command}` (CI runs the test command there)"


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    """The check is not vacuous: a missing file, a missing anchor and a missing heading of another
    page are each reported, while good links, code and web links are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## The `x` option, and y (z)\n\n## Twice\n\n## Twice\n",
                                            encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#the-x-option-and-y-z) [ok](docs/a.md#twice-1) [ok](#top) [ok](docs/)\n"
        "[web](https://example.org/missing.md) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#nope) [bad local](#nowhere)\n",
        encoding="utf-8")
    problems = broken_links(readme, tmp_path)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == ["docs/b.md", "docs/a.md#nope", "#nowhere"]
    assert all(p.startswith("README.md:8: ") for p in problems)
