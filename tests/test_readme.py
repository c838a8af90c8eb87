"""The README and the manual in docs/: their Python examples run as written, their relative
links resolve, and the README stays a front door (at most 250 lines)."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# pages whose ```python blocks run: the README and the manual
RUN = [README, *sorted((ROOT / "docs").glob("*.md"))]
# pages whose links must resolve: those, and the other documentation pages they link to
LINKED = [*RUN, ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md",
          ROOT / "experiments" / "README.md"]
NOT_RUN = "# not run in tests"
README_MAX_LINES = 250


def blocks():
    for page in RUN:
        text = page.read_text()
        for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
            if NOT_RUN not in m.group(1):
                line = text.count("\n", 0, m.start()) + 2
                # padded so that a traceback's line numbers are the page's
                yield pytest.param(page, "\n" * (line - 1) + m.group(1),
                                   id=f"{page.relative_to(ROOT)}:{line}")


@pytest.mark.parametrize("page,code", list(blocks()))
def test_doc_example_runs(page, code):
    exec(compile(code, str(page), "exec"), {"__name__": "__readme__"})


def test_every_page_is_tested():
    assert len(RUN) > 1, "docs/*.md not found"
    for page in LINKED:
        assert page.is_file(), page


def test_readme_is_a_front_door():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, at most {README_MAX_LINES}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not inside code blocks
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            yield target


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_code_cites_the_math_by_existing_sections():
    """Every comment that cites the method's equations cites docs/math.md, by a section that
    exists (the SPEC file the comments used to cite is not in the repository)."""
    root = Path(__file__).resolve().parent.parent
    math = (root / "docs" / "math.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", math, flags=re.M))
    cited = 0
    for path in [*root.glob("dqo/**/*.py"), *root.glob("dqo_kernels/**/*.py"),
                 *root.glob("csrc/*"), *root.glob("tests/**/*.py")]:
        text = path.read_text()
        assert not re.search(r"SPEC(\.md)? (section )?\d", text), path
        for ref in re.findall(r"docs/math\.md §(\d+(?:\.\d+)?(?:[-/]\d+(?:\.\d+)?)?)", text):
            for part in re.split(r"[-/]", ref):
                part = part if "." in part or "." not in ref else f"{ref.split('.')[0]}.{part}"
                assert part in sections, (path, ref)
                cited += 1
    assert cited >= 15
