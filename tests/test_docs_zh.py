"""The Chinese pages (docs/zh/): their terms are the glossary's, and they keep apart what it keeps apart.

A term the pages gloss on first use, 中文（english）, must be in the glossary,
and so must the terms that are easy to mix up. 跟踪 is the trace
(mode), 回溯 a traceback; 对端 is the remote end of a TCP connection, 另一侧
the other socket of the forwarder's pair: the phrases that mixed them up
must not come back. The diagrams: the Chinese page draws what the English
one draws, and a sequence diagram's text stays readable at 1280 px.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Dict, List, Set

import pytest

from conftest import ROOT

ZH = ROOT / "docs" / "zh"
PAGES = sorted(ZH.glob("*.md")) + sorted((ZH / "lessons").glob("*.md"))
GLOSSARY = ZH / "glossary.md"


def prose(page: Path) -> str:
    """A page's text without its code blocks and HTML comments."""
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^(`{3,}|~{3,}).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)


def glossary() -> Dict[str, List[str]]:
    """English names (every spelling a row gives) -> the Chinese terms of that row."""
    rows: Dict[str, List[str]] = {}
    for line in GLOSSARY.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] in ("英文", "---"):
            continue
        english, chinese = cells[0], [term.strip() for term in re.split("[、，]", cells[1])]
        names = re.split(r"\s*/\s*|\s*,\s*|\s*\(\s*|\s*\)\s*", english.replace("`", ""))
        for name in filter(None, names):
            rows[name.lower()] = chinese
    return rows


def glossed_terms() -> Set[str]:
    """The English of every 中文（english） or *中文*（english，...） gloss on the pages, english in lower case."""
    found = set()
    for page in PAGES:
        for match in re.finditer(r"[\u4e00-\u9fff]\**（([a-z][a-z \-]{1,30})[，,）]", prose(page)):
            found.add(match.group(1))
    return found


def test_every_term_the_pages_gloss_is_in_the_glossary() -> None:
    missing = sorted(glossed_terms() - set(glossary()))
    assert not missing, f"glossed on a page but not in glossary.md: {missing}"


@pytest.mark.parametrize("term", ["回溯", "跟踪", "对端", "另一侧", "谓词", "全面检查"])
def test_glossary_has_the_terms_that_are_easy_to_mix_up(term: str) -> None:
    assert any(term in terms for terms in glossary().values())


#: Phrases that used one term for the other: 跟踪 for a traceback, 对端 for the other side of the pair.
MIXED_UP = {
    "跟踪 for a traceback": re.compile(r"打印[^。；：]{0,8}跟踪|跟踪信息|(ImportError|完整的|精简的)\S{0,2}跟踪"),
    "对端 for the other side": re.compile(r"对端的?(缓冲区|队列|`forward|`handle_write|跟得上|有空间)"
                                          r"|交给对端|关闭它的对端|把对端(指明|也标)|partner` 就是它的对端|对侧|对面"),
    "another word for a glossary term": re.compile(r"accept 暂停|跟踪信息"),
}


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ZH)))
def test_page_keeps_traceback_and_trace_and_peer_and_other_side_apart(page: Path) -> None:
    text = prose(page)
    mixed = {name: pattern.search(text).group() for name, pattern in MIXED_UP.items()  # type: ignore[union-attr]
             if pattern.search(text)}
    assert not mixed


# -- diagrams -------------------------------------------------------------------------

DOCS = ROOT / "docs"
#: What keeps a sequence diagram's text readable at 1280 px: Mermaid spaces the actors by
#: the longest label between them and scales a drawing wider than the page down, text
#: and all. So the actors are narrow and the labels are broken into short lines (by hand:
#: Mermaid's own wrapping hyphenates names and Chinese, and overflows the notes).
SEQUENCE_INIT = '%%{init: {"sequence": {"width": 110, "actorMargin": 30}}}%%'
LABEL_COLUMNS = 32
LABEL = re.compile(r"^\s*(?:Note (?:over|left of|right of) [\w,]+|\w+-?-?>>\w+)\s*:\s*(?P<text>.*)$")


def diagrams(page: Path) -> List[str]:
    return re.findall(r"^```mermaid\n(.*?)^```", page.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)


def kind(diagram: str) -> str:
    return next(line.split()[0] for line in diagram.splitlines() if line.strip() and not line.startswith("%%"))


def columns(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


SEQUENCE_PAGES = [page for page in sorted(DOCS.rglob("*.md"))
                  if any(kind(diagram) == "sequenceDiagram" for diagram in diagrams(page))]


@pytest.mark.parametrize("page", SEQUENCE_PAGES, ids=lambda path: str(path.relative_to(DOCS)))
def test_sequence_diagrams_have_narrow_actors_and_short_label_lines(page: Path) -> None:
    for diagram in diagrams(page):
        if kind(diagram) != "sequenceDiagram":
            continue
        assert diagram.startswith(SEQUENCE_INIT + "\n"), f"{page.name}: {diagram.splitlines()[:2]}"
        lines = [line for match in filter(None, map(LABEL.match, diagram.splitlines()))
                 for line in match.group("text").split("<br/>")]
        wide = [line for line in lines if columns(line) > LABEL_COLUMNS]
        assert lines and not wide, f"{page.name}: label lines wider than {LABEL_COLUMNS} columns: {wide}"


def test_chinese_diagrams_page_draws_what_the_english_one_draws() -> None:
    english, chinese = DOCS / "diagrams.md", ZH / "diagrams.md"
    assert [kind(d) for d in diagrams(chinese)] == [kind(d) for d in diagrams(english)]
    participants = [re.findall(r"participant (\w+)", d) for d in diagrams(english)]
    assert [re.findall(r"participant (\w+)", d) for d in diagrams(chinese)] == participants
    assert [len(d.splitlines()) for d in diagrams(chinese)] == [len(d.splitlines()) for d in diagrams(english)]


@pytest.mark.parametrize("page", [DOCS / "diagrams.md", ZH / "diagrams.md"], ids=["en", "zh"])
def test_diagrams_pages_give_the_diagrams_the_page_width(page: Path) -> None:
    """Without the table of contents beside them, the diagrams' text is 13.8 px or more at 1280 px (measured)."""
    front = re.match(r"---\n(.*?)\n---\n", page.read_text(encoding="utf-8"), re.DOTALL)
    assert front is not None and re.search(r"^hide:\n(  - \w+\n)*  - toc$", front.group(1) + "\n", re.MULTILINE)


def test_chinese_pages_link_the_chinese_diagrams() -> None:
    linking = [page.name for page in PAGES if "../diagrams.md" in page.read_text(encoding="utf-8")]
    assert not linking
