"""Relative links in README.md, docs/*.md and benchmarks/README.md point at files and headings
that exist, so a newcomer following them never lands on nothing."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    return files + sorted((ROOT / "docs").glob("*.md"))


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets and code marks dropped, lower case,
    punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """'target: why' for every relative link of ``path`` that does not resolve."""
    problems = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.\-]*:", target):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.exists():
                problems.append(f"{target}: {rel} does not exist")
                continue
            if anchor and (dest.is_dir() or dest.suffix != ".md"):
                problems.append(f"{target}: an anchor into {rel}, which is not a markdown file")
            elif anchor and anchor not in anchors(dest):
                problems.append(f"{target}: {rel} has no heading with anchor #{anchor}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path):
    assert broken_links(path) == []


def test_docs_and_code_cite_the_methods_page_not_the_old_spec():
    sources = [p for folder in ("runtime", "export", "calibration", "benchmarks", "tests")
               for p in (ROOT / folder).rglob("*.py") if p != Path(__file__)]
    old = "METHODS" + ".md"
    stale = [p.relative_to(ROOT).as_posix() for p in [*markdown_files(), *sources]
             if old in p.read_text(encoding="utf-8")]
    assert stale == [], "cite docs/methods.md (with an anchor) instead of METHODS.md"


def test_checker_reports_missing_files_and_anchors(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Second `part`, again\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#second-part-again) [self](#top) [gone](docs/b.md)\n"
                    "[bad anchor](docs/a.md#third) [not yet](docs/deployment.md)\n"
                    "```\n[in code](nowhere.md)\n```\n`[in a span](nowhere.md)`\n"
                    "[web](https://example.com/x.md)\n\n# Top\n")
    assert broken_links(page) == ["docs/b.md: docs/b.md does not exist",
                                  "docs/a.md#third: docs/a.md has no heading with anchor #third",
                                  "docs/deployment.md: docs/deployment.md does not exist"]


def test_slug_follows_github():
    assert slug("`clipinspect loadtest` (also `python -m clipinspect.benchmarks.loadtest`)") \
        == "clipinspect-loadtest-also-python--m-clipinspectbenchmarksloadtest"
    assert slug("predict's outputs") == "predicts-outputs"
    assert slug("WinCLIP+ (few-shot)") == "winclip-few-shot"
