"""The Chinese copies of the lesson scripts, and the width of the code the lesson pages show.

The Chinese lesson pages show examples/lessons/zh/, made by
examples/lessons/zh_copies.py from the English scripts and a translation
table. A copy must be the English program token for token (only comments
and docstrings differ: so it passes every lesson test the English script
passes), up to date with the script and the table, and shown by the pages.
The scripts' lines that the lesson pages show must fit a page's code block.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import tokenize
import types
import unicodedata
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import ROOT

LESSONS = ROOT / "examples" / "lessons"
DOCS = ROOT / "docs"
STEPS = sorted(path.name for path in LESSONS.glob("step[0-9][0-9]_*.py"))
#: Columns a lesson page's code block shows at 1280 px (688 px at 6.8 px a
#: column, less its padding, is 97; one spare), a diff's +/- included.
COLUMNS = 96
DIRECTIVE = re.compile(r"<!--\s*(include|diff):?\s*(?P<args>.*?)\s*-->")


def copies() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("zh_copies", LESSONS / "zh_copies.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def code_tokens(source: str) -> List[Tuple[int, str, int]]:
    """The tokens of ``source`` that make the program, with their lines: no comment, no docstring, no blank line."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    docstrings = {tok.start for tok in copies().docstring_tokens(tokens)}
    return [(tok.type, tok.string, tok.start[0]) for tok in tokens
            if tok.type not in (tokenize.COMMENT, tokenize.NL) and tok.start not in docstrings]


def without_docstrings(source: str) -> str:
    """ast.dump of ``source`` with every docstring taken out."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.dump(tree)


@pytest.mark.parametrize("name", STEPS)
def test_chinese_copy_is_the_english_code_token_for_token(name: str) -> None:
    """And line for line: a line number in a traceback or a log line is the same in both."""
    english = (LESSONS / name).read_text(encoding="utf-8")
    chinese = (LESSONS / "zh" / name).read_text(encoding="utf-8")
    assert code_tokens(chinese) == code_tokens(english)
    if not name.startswith("step00"):  # the article's step00 is Python 2: tokens only
        assert without_docstrings(chinese) == without_docstrings(english)


@pytest.mark.parametrize("name", STEPS)
def test_chinese_copy_comments_and_docstrings_are_chinese(name: str) -> None:
    """Every comment and docstring was translated (the article's commented-out prints excepted)."""
    source = (LESSONS / "zh" / name).read_text(encoding="utf-8")
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    prose = [tok.string for tok in tokens if tok.type == tokenize.COMMENT
             and not copies().CODE_COMMENT.match(tok.string[1:].strip())]
    prose += [tok.string for tok in copies().docstring_tokens(tokens)]
    english = [text for text in prose if not re.search(r"[\u4e00-\u9fff]", text)]
    assert prose and not english


def test_chinese_copies_are_up_to_date() -> None:
    """When this fails: python examples/lessons/zh_copies.py (after adding any new comment to its table)."""
    module = copies()
    table = module.read_table()
    for name in STEPS:
        expected = module.translate((LESSONS / name).read_text(encoding="utf-8"), table, name)
        assert (LESSONS / "zh" / name).read_text(encoding="utf-8") == expected, f"zh/{name} is out of date"


def test_every_translation_is_used() -> None:
    """A comment the scripts no longer have leaves the table too."""
    module = copies()
    table = module.read_table()
    used = set()

    class Recording(dict):
        def get(self, key, default=None):  # type: ignore[no-untyped-def]
            used.add(key)
            return table.get(key, default)

    for name in STEPS:
        module.translate((LESSONS / name).read_text(encoding="utf-8"), Recording(), name)
    assert not {module.key(key) for key in table} - {module.key(key) for key in used}


def test_a_comment_missing_from_the_table_is_named() -> None:
    with pytest.raises(KeyError, match="a new comment"):
        copies().translate("x = 1  # a new comment\n", {}, "step99.py")


def test_a_translation_takes_the_lines_the_english_takes() -> None:
    module = copies()
    source = "x = 1\n# one\n# two\n# three\n"
    table = {"one two three": "读到 EOF 之后 readable() 仍是 True，poll() 每一轮都报告这个套接字。"}
    assert module.translate(source, table).count("\n") == source.count("\n")
    with pytest.raises(ValueError, match="does not fit"):
        module.translate("x = 1\n# one\n", {"one": "很长的译文" * 30})


def test_a_chinese_comment_is_wrapped_to_the_width() -> None:
    module = copies()
    text = "读到 EOF 之后 readable() 仍是 True，poll() 每一轮都报告这个套接字。" * 3
    lines = module.wrap(text, 40)
    assert len(lines) > 1 and all(width(line) <= 40 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert not any(line[0] in "，。" for line in lines)


def directives(page: Path) -> List[List[str]]:
    return [match.group("args").split() for match in DIRECTIVE.finditer(page.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("page", sorted((DOCS / "zh" / "lessons").glob("step*.md")), ids=lambda path: path.name)
def test_chinese_lesson_page_shows_the_chinese_copies(page: Path) -> None:
    paths = [arg.partition("#")[0] for args in directives(page) for arg in args]
    english = [path for path in paths if re.fullmatch(r"examples/lessons/step\d\d_\w+\.py", path)]
    assert not english, f"{page.name} shows the English scripts: {english}"


def shown_lines(page: Path) -> List[str]:
    """The lines of the lesson scripts that ``page`` shows, as it shows them (a diff's with their +/-)."""
    include = copies_hook()
    lines: List[str] = []
    for args in directives(page):
        if not any(arg.startswith("examples/lessons/") for arg in args):
            continue
        name = "diff" if len(args) == 2 else "include"
        block = include.render_directive(name, " ".join(args), ROOT)
        lines += block.split("\n")[1:-1]
    return lines


def copies_hook() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hook_include_zh", DOCS / "hooks" / "include.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def article_lines() -> set:
    """The article's own lines, kept as printed in every step (its option lines are long): exempt."""
    return {line.strip() for line in (LESSONS / "step00_article.py").read_text(encoding="utf-8").splitlines()}


LESSON_PAGES = sorted((DOCS / "lessons").glob("step*.md")) + sorted((DOCS / "zh" / "lessons").glob("step*.md"))


@pytest.mark.parametrize("page", LESSON_PAGES, ids=lambda path: str(path.relative_to(DOCS)))
def test_script_lines_on_a_lesson_page_fit_its_code_block(page: Path) -> None:
    article = article_lines()
    wide = [line for line in shown_lines(page)
            if width(line) > COLUMNS and line[1:].strip() not in article and line.strip() not in article]
    assert not wide, f"{page.name}: lines wider than {COLUMNS} columns: {wide}"


def test_code_blocks_wrap_lines_wider_than_the_page() -> None:
    """The library's code (120 columns) and long output lines wrap instead of being cut at the block's edge."""
    css = (DOCS / "stylesheets" / "extra.css").read_text(encoding="utf-8")
    rule = re.search(r"\.md-typeset pre > code\s*\{(?P<body>[^}]*)\}", css)
    assert rule is not None and "white-space: pre-wrap" in rule.group("body")
