"""The documentation's build hooks (docs/hooks/), and the pages' references to the code.

The hooks' functions are plain Python: these tests run them without MkDocs.
The last tests read the real pages, so that a renamed method or test breaks
the suite, not only the docs build.
"""

from __future__ import annotations

import importlib.util
import re
import types
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"


def load_hook(name: str) -> types.ModuleType:
    path = DOCS / "hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


include = load_hook("include")
site = load_hook("site")

SAMPLE = '''"""A module."""

import functools


LIMIT = 3


class Greeter:
    """Says hello."""

    @functools.lru_cache()
    def greet(self, name):
        """Greet ``name``."""
        return f"hello {name}"

    def leave(self):
        return "bye"


def helper():
    return 1
'''


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small repository: a package module and two versions of a script."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(SAMPLE)
    (tmp_path / "old.py").write_text("a = 1\nb = 2\n")
    (tmp_path / "new.py").write_text("a = 1\nb = 3\n")
    (tmp_path / "notes.txt").write_text("plain text\n")
    return tmp_path


def test_include_of_a_whole_file_becomes_a_python_block(repo: Path) -> None:
    out = include.expand("before\n<!-- include: pkg/mod.py -->\nafter", repo)
    assert out == "before\n```python\n" + SAMPLE.rstrip("\n") + "\n```\nafter"


def test_include_of_a_method_keeps_its_decorator_and_docstring_dedented(repo: Path) -> None:
    out = include.expand("<!-- include: pkg/mod.py#Greeter.greet -->", repo)
    assert out.splitlines() == [
        "```python",
        "@functools.lru_cache()",
        "def greet(self, name):",
        '    """Greet ``name``."""',
        '    return f"hello {name}"',
        "```",
    ]


def test_include_of_a_module_assignment_shows_that_statement(repo: Path) -> None:
    assert include.expand("<!-- include: pkg/mod.py#LIMIT -->", repo) == "```python\nLIMIT = 3\n```"


def test_language_follows_the_extension(repo: Path) -> None:
    assert include.expand("<!-- include: notes.txt -->", repo) == "```text\nplain text\n```"


def test_diff_becomes_a_unified_diff_block(repo: Path) -> None:
    out = include.expand("<!-- diff: old.py new.py -->", repo)
    assert out.splitlines() == ["```diff", "--- old.py", "+++ new.py", "@@ -1,2 +1,2 @@",
                                " a = 1", "-b = 2", "+b = 3", "```"]


def test_cli_help_is_the_parsers_help() -> None:
    from asyncore_fwd.cli import build_parser

    out = include.expand("<!-- cli-help -->", ROOT)
    assert out.startswith("```text\nusage: asyncore-fwd")
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in out


@pytest.mark.parametrize("line, message", [
    ("<!-- include: pkg/missing.py -->", "pkg/missing.py: no such file"),
    ("<!-- include: pkg/mod.py#Greeter.wave -->", "no 'wave' in 'Greeter.wave'"),
    ("<!-- include: pkg/mod.py#Nobody -->", "no 'Nobody'"),
    ("<!-- diff: old.py -->", "diff takes two paths"),
    ("<!-- include: ../outside.py -->", "not inside the repository"),
], ids=["missing file", "missing method", "missing name", "one path for diff", "outside the repository"])
def test_bad_directive_fails_naming_the_page_line_and_problem(repo: Path, line: str, message: str) -> None:
    with pytest.raises(include.DirectiveError) as raised:
        include.expand(f"# Title\n\n{line}", repo, "guide.md")
    assert str(raised.value).startswith(f"guide.md, line 3: {line}: ")
    assert message in str(raised.value)


def test_directive_inside_a_code_block_is_shown_as_written(repo: Path) -> None:
    page = "````markdown\n<!-- include: pkg/missing.py -->\n```\n````\n<!-- include: pkg/mod.py#LIMIT -->"
    out = include.expand(page, repo)
    assert out == "````markdown\n<!-- include: pkg/missing.py -->\n```\n````\n```python\nLIMIT = 3\n```"


def test_directive_in_a_list_item_keeps_its_indentation(repo: Path) -> None:
    out = include.expand("1. Step:\n\n    <!-- include: pkg/mod.py#LIMIT -->", repo)
    assert out == "1. Step:\n\n    ```python\n    LIMIT = 3\n    ```"


def test_fence_is_longer_than_any_backtick_run_in_the_code(repo: Path) -> None:
    (repo / "doc.md").write_text("```python\nx\n```\n")
    out = include.expand("<!-- include: doc.md -->", repo)
    assert out == "````markdown\n```python\nx\n```\n````"


def test_comment_that_is_not_a_whole_line_is_left_alone(repo: Path) -> None:
    text = "see `<!-- include: pkg/missing.py -->` in the docs"
    assert include.expand(text, repo) == text


def test_missing_nav_pages_are_found_in_nested_sections() -> None:
    nav = [{"Home": "index.md"}, {"Lessons": ["lessons/index.md", {"Step": "lessons/step01.md"}]},
           {"Elsewhere": "https://example.org/"}]
    assert site.missing_pages(nav, {"index.md", "lessons/index.md"}) == [("Step", "lessons/step01.md")]


def test_language_switch_leads_to_the_translation_or_else_the_home_page() -> None:
    existing = {"index.md", "checklist.md", "api.md", "zh/index.md", "zh/checklist.md"}
    assert site.translation("checklist.md", "zh", existing) == "zh/checklist.md"
    assert site.translation("zh/checklist.md", "en", existing) == "checklist.md"
    assert site.translation("api.md", "zh", existing) == "zh/index.md"
    assert site.translation("zh/glossary.md", "en", existing) == "index.md"


# -- the real pages ------------------------------------------------------------


def english_and_chinese_pages() -> list:
    return sorted(path for path in DOCS.rglob("*.md") if "hooks" not in path.parts)


def test_every_directive_in_the_pages_resolves() -> None:
    for page in english_and_chinese_pages():
        include.expand(page.read_text(encoding="utf-8"), ROOT, str(page.relative_to(ROOT)))


def test_every_test_named_in_the_pages_exists() -> None:
    named = set()
    for page in english_and_chinese_pages():
        named |= set(re.findall(r"(tests/test_\w+\.py)::(test_\w+)", page.read_text(encoding="utf-8")))
    assert named, "the pages name no test: the pattern no longer matches"
    missing = [f"{path}::{name}" for path, name in sorted(named)
               if not re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.MULTILINE)]
    assert not missing, f"the docs name tests that do not exist: {missing}"


def test_english_chrome_is_found_in_a_page() -> None:
    english = ('<input placeholder="Search">\n<label>\n  Table of contents\n</label>\n'
               '<span class="md-footer__direction">\n  Previous\n</span>')
    assert site.english_chrome(english) == ["search box", "table of contents", "footer"]


def test_chinese_chrome_is_not_english() -> None:
    chinese = ('<input placeholder="搜索">\n<nav aria-label="目录">\n<span class="md-footer__direction">上一页</span>'
               '\n"clipboard.copy": "\\u590d\\u5236"\n<p>Table of contents, Search: the words in the text</p>')
    assert site.english_chrome(chinese) == []


def test_chinese_pages_take_the_theme_strings_in_chinese() -> None:
    """The theme's language partial, overridden: zh for pages under zh/, the site's language elsewhere."""
    template = (DOCS / "overrides" / "partials" / "language.html").read_text(encoding="utf-8")
    assert 'page.file.src_uri.startswith("zh/")' in template
    assert '"partials/languages/" ~ page_language ~ ".html"' in template



def load_check_pages() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("docs_check_pages", DOCS / "check_pages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_check_reports_a_scrolling_code_block_and_a_shrunken_diagram() -> None:
    check = load_check_pages()
    results = [{"page": "/lessons/step05/", "scrolling": ["        return (len(self.receiver.from_remote_buffer) > 0)"],
                "diagrams": [{"natural": 1669, "given": 688}, {"natural": 900, "given": 938}]}]
    found = check.problems(results)
    assert len(found) == 2
    assert "scrolls sideways" in found[0] and "diagram 1 is 1669 px wide in 688 px: its text is 6.6 px" in found[1]


def test_page_check_passes_a_diagram_drawn_at_twelve_px_or_more() -> None:
    check = load_check_pages()
    results = [{"page": "/diagrams/", "scrolling": [], "diagrams": [{"natural": 1200, "given": 938}]}]
    assert check.problems(results) == []
