"""The repository stands alone: no file points outside it, and doc links resolve.

Scans every text file git knows about (tracked, plus new files not ignored) so that a comment,
a test or a doc cannot cite material that only exists on one machine, and every relative link
of the Markdown docs (README.md, docs/*.md) names a file - and heading - that exists.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Built from pieces so that this file does not contain what it looks for.
_SLASH = "/"
FORBIDDEN: tuple[str, ...] = (
    _SLASH + "work" + _SLASH,  # the workspace the project was started in
    ".." + _SLASH + "shared",  # a sibling directory of the checkout
    "shared" + _SLASH + "dde-" + "protocol",  # the vendor digest outside the repo
    "design" + "-notes",  # the design notes outside the repo
    "tmp" + _SLASH + "venv" + _SLASH,  # somebody's virtualenv
)

_MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
_DOCS_MENTION = re.compile(r"(?<![\w.-])docs/[\w.-]+\.(?:md|yaml)\b")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def repo_files() -> list[Path]:
    """Tracked files and new files git does not ignore; never anything under .venv."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    names = sorted({n for n in out.decode().split("\0") if n})
    return [ROOT / n for n in names if not n.startswith(".venv/") and (ROOT / n).is_file()]


def read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None  # binary
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_references(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line naming a path outside the repository."""
    return [
        (n, line.strip())
        for n, line in enumerate(text.splitlines(), 1)
        if any(p in line for p in FORBIDDEN)
    ]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    out: set[str] = set()
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            out.add(slug(m.group(1)))
    return out


def broken_links(md: Path) -> list[str]:
    """Relative links of one Markdown file whose file (or heading anchor) does not exist."""
    problems = []
    fenced = False
    for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        if fenced:
            continue
        for target in _MD_LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (http:, mailto:, ...) or a heading of the same page
            name, _, anchor = target.partition("#")
            dest = (md.parent / name).resolve()
            where = f"{md.relative_to(ROOT)}:{n}: {target}"
            if not dest.is_file():
                problems.append(f"{where} (no such file)")
            elif (
                anchor
                and dest.suffix == ".md"
                and anchor not in anchors(dest.read_text(encoding="utf-8"))
            ):
                problems.append(f"{where} (no such heading)")
    return problems


def markdown_docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# -- the checks ------------------------------------------------------------------------------


def test_no_file_names_a_path_outside_the_repository() -> None:
    found = []
    for path in repo_files():
        text = read_text(path)
        if text is None:
            continue
        found += [f"{path.relative_to(ROOT)}:{n}: {line}" for n, line in outside_references(text)]
    assert not found, "files citing paths outside the repository:\n" + "\n".join(found)


def test_relative_links_in_the_docs_resolve() -> None:
    problems = [p for md in markdown_docs() for p in broken_links(md)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_docs_files_named_anywhere_exist() -> None:
    missing = []
    for path in repo_files():
        text = read_text(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for mention in _DOCS_MENTION.findall(line):
                if not (ROOT / mention).is_file():
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {mention}")
    assert not missing, "mentions of docs that do not exist:\n" + "\n".join(missing)


# -- the checks can fail ---------------------------------------------------------------------


def test_outside_references_are_recognised() -> None:
    for pattern in FORBIDDEN:
        assert outside_references(f"ok\nsee {pattern}x.md here\n") == [
            (2, f"see {pattern}x.md here")
        ]
    assert outside_references("docs/vendor-protocol.md and docs/design.md") == []


def test_broken_links_are_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n## Some: Section `x`\ntext\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md) [ok](a.md#some-section-x) [web](https://example.com/x.md) [self](#top)\n"
        "```\n[ignored](in-a-code-block.md)\n```\n"
        "[gone](missing.md) [bad anchor](a.md#nope)\n"
    )
    assert broken_links(page) == [
        "b.md:5: missing.md (no such file)",
        "b.md:5: a.md#nope (no such heading)",
    ]
