"""The docs hold together: the files they name exist, their links and section citations resolve,
and their Python examples parse and call explain as its signature wants.

Checked texts: README.md, docs/*.md and benchmarks/RESULTS.md whole, and the comments and docstrings
of the Python and C++ sources.  A path is a word that starts with one of the repository's folders
(caffast, docs, csrc, benchmarks, scripts, tests, examples) followed by a slash.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("caffast", "docs", "csrc", "benchmarks", "scripts", "tests", "examples")
SOURCE_FOLDERS = ("caffast", "csrc", "tests", "benchmarks", "scripts", "examples")

PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w.*/-]*)" % "|".join(FOLDERS))
# a file of docs/ and one of its headings, as in the fused-head code's "docs/design.md, 'The fused head'"
CITATION = re.compile(r"(?<![\w/-])(?:docs/)?([\w-]+\.md), '([^'\n]+)'")
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]


def source_files() -> list[Path]:
    suffixes = {".py", ".h", ".cpp"}
    return sorted(p for folder in SOURCE_FOLDERS for p in (ROOT / folder).rglob("*") if p.suffix in suffixes)


def comments_and_docstrings(path: Path) -> str:
    """The prose of a source file: its comments and its string statements (docstrings)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return "\n".join(re.findall(r"//[^\n]*|/\*.*?\*/", text, re.S))
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            parts.append(node.value.value)
    return "\n".join(parts)


def texts() -> list[tuple[Path, str]]:
    """Every checked text, by the file it comes from."""
    return [(p, p.read_text(encoding="utf-8")) for p in markdown_files()] + [
        (p, comments_and_docstrings(p)) for p in source_files()
    ]


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def headings(path: Path) -> tuple[list[str], set[str]]:
    """The headings of a markdown file (outside code blocks) and their anchors."""
    titles = [m.group(2) for m in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8")))]
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for title in titles:
        base = slug(title)
        count = seen.get(base, 0)
        anchors.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return titles, anchors


def named_paths(text: str) -> set[str]:
    names = set()
    for match in PATH.finditer(text):
        name = re.split(r"[{]", match.group(1))[0].rstrip(".-")
        if name.endswith("/") and name.count("/") == 1 and name[:-1] in FOLDERS:
            continue  # the folder itself
        names.add(name)
    return names


def exists(name: str) -> bool:
    if "*" in name:
        return any(ROOT.glob(name))
    return (ROOT / name).exists()


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


def test_the_checked_texts_are_found():
    names = [relative(p) for p in markdown_files()]
    assert all((ROOT / n).is_file() for n in names), names
    assert {"docs/design.md", "docs/api.md", "docs/cli.md", "docs/dropin.md", "docs/benchmarks.md"} <= set(names)
    sources = {relative(p) for p in source_files()}
    assert {"caffast/core/heads.py", "csrc/fused_objective.h", "tests/test_docs.py"} <= sources


@pytest.mark.parametrize("path", markdown_files() + source_files(), ids=relative)
def test_named_files_exist(path: Path):
    text = path.read_text(encoding="utf-8") if path.suffix == ".md" else comments_and_docstrings(path)
    missing = sorted(name for name in named_paths(text) if not exists(name))
    assert not missing, f"{relative(path)} names files that are not in the repository: {missing}"


def test_section_citations_name_real_headings():
    wrong = []
    cited = 0
    for path, text in texts():
        for match in CITATION.finditer(text):
            target, section = ROOT / "docs" / match.group(1), match.group(2)
            cited += 1
            if not target.is_file() or section not in headings(target)[0]:
                wrong.append(f"{relative(path)}: {match.group(0)}")
    assert cited >= 10  # the fused-head code cites docs/design.md throughout
    assert not wrong, "citations of a missing file or heading:\n" + "\n".join(wrong)


def test_no_text_cites_a_design_file_outside_the_repository():
    # the method's notes live in docs/design.md; section numbers of an outside file mean nothing here
    citing = [relative(p) for p, text in texts() if re.search(r"DESIGN\.md|design\.md section", text)]
    assert not citing, citing


@pytest.mark.parametrize("path", markdown_files(), ids=relative)
def test_markdown_links_resolve(path: Path):
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z+.-]*:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists() or ROOT not in (linked, *linked.parents):
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in headings(linked)[1]:
            broken.append(f"{target}: no such heading")
    assert not broken, f"{relative(path)}: " + "; ".join(broken)


def explain_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            base = getattr(func.value, "id", None) if isinstance(func, ast.Attribute) else None
            if name == "explain" and base in (None, "caffast"):
                yield node


@pytest.mark.parametrize("path", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=relative)
def test_python_examples_parse_and_pass_explain_settings_by_keyword(path: Path):
    calls = 0
    for block in python_blocks(path):
        tree = ast.parse(block)  # a SyntaxError names the block's line
        for call in explain_calls(tree):
            calls += 1
            assert len(call.args) <= 3, (
                f"{relative(path)}: explain(...) with {len(call.args)} positional arguments at line {call.lineno} "
                "of a code block; pass every argument after the layer by keyword"
            )
    if path.name in ("README.md", "api.md"):
        assert calls, f"{relative(path)} shows no explain call"


def test_the_ci_test_command_follows_its_marker():
    # .ci/run runs the bash block right after the marker: it must stay there, and be the one command
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    marker = readme.index("<!-- test-command -->")
    block = re.match(r"\s*```bash\n(.+?)\n```\n", readme[marker + len("<!-- test-command -->") :], re.S)
    assert block is not None and "\n" not in block.group(1)
    assert "pytest" in block.group(1) and ".[test]" in block.group(1)
