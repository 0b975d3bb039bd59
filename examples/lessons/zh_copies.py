"""Write the Chinese copies of the lesson scripts: python zh_copies.py [--check]

The Chinese pages show the steps with Chinese comments and docstrings, and
the diff between two steps *is* the lesson: so the copies must be the same
programs as the English scripts, token for token, and their diffs the same
diffs. Strategy: one source of truth, the English script; one translation
table, zh/translations.txt, in which each English comment or docstring
appears once (the steps share most of them, so a diff between two Chinese
copies changes the same lines as the English diff). This script finds every
comment and docstring with tokenize, looks it up in the table and writes
zh/<the same name>.py; code, strings and layout are copied as they are. A
comment is re-wrapped to fit 79 columns (a Chinese character takes two); a
docstring keeps the line breaks the table gives it. Either takes as many
lines as the English, so that a line number (in a traceback, a log line, a
page) is the same in both copies.

A comment or docstring missing from the table is an error that names it; a
comment that is code left commented out by the article (``# print ...``) is
kept as it is. --check writes nothing and fails if a copy is out of date.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys
import tokenize
import unicodedata
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ZH = HERE / "zh"
TABLE = ZH / "translations.txt"
#: The widest line a copy may have, in columns (the lesson pages' code blocks show 80).
WIDTH = 79
#: A comment that is the article's commented-out code: not prose, kept as it is.
CODE_COMMENT = re.compile(r"^print\b")
#: Punctuation that must not start a line, and that ends a line without a space.
NO_LINE_START = set("，。、；：？！）》」』,.;:?!)")
#: How far back (in columns) a full line may end early, at a punctuation mark or a space.
BREAK_SLACK = 12

log = logging.getLogger("zh_copies")


def scripts() -> List[Path]:
    """The English lesson scripts: the steps."""
    return sorted(HERE.glob("step[0-9][0-9]_*.py"))


# -- the table --------------------------------------------------------------------


def key(text: str) -> str:
    """How a comment is looked up: its words, whitespace collapsed."""
    return " ".join(text.split())


def read_table(path: Path = TABLE) -> Dict[str, str]:
    """English -> Chinese, from the table's blocks: a line ``== en``, the English, ``-- zh``, the Chinese.

    A docstring's key is its text with the line breaks it has; a comment's, its words.
    """
    table: Dict[str, str] = {}
    english: List[str] = []
    chinese: List[str] = []
    part: Optional[List[str]] = None
    lines = path.read_text(encoding="utf-8").split("\n")

    def flush() -> None:
        if english:
            source = "\n".join(english).strip("\n")
            table[source] = "\n".join(chinese).strip("\n")
            table.setdefault(key(source), table[source])

    for line in lines:
        if line == "== en":
            flush()
            english, chinese = [], []
            part = english
        elif line == "-- zh":
            part = chinese
        elif part is not None:
            part.append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{path.name}: text outside an '== en' block: {line!r}")
    flush()
    return table


# -- Chinese line breaking ----------------------------------------------------------


def width(text: str) -> int:
    """Columns ``text`` takes in a terminal or a code block: two for a CJK character."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def units(text: str) -> Iterator[str]:
    """The pieces a line may break between: a run of ASCII (a name, a number), a space, one CJK character."""
    for match in re.finditer(r"[!-~]+| +|[^\x00-\x7f]", text):
        yield match.group()


def wrap(text: str, columns: int) -> List[str]:
    """``text`` in lines of at most ``columns`` columns, not breaking a name nor starting with a comma.

    A full line ends, if it can, after a punctuation mark or a space among its
    last few columns rather than in the middle of a word (客户|端).
    """
    lines: List[str] = []
    line: List[str] = []
    for unit in units(text):
        hangs = len(unit) == 1 and unit in NO_LINE_START   # may end a full line: keep two columns for it
        if line and not hangs and width("".join(line) + unit.rstrip()) > columns - 2:
            cut = next((index for index in range(len(line) - 1, 0, -1)
                        if (line[index - 1] in NO_LINE_START or line[index - 1].isspace())
                        and width("".join(line[index:])) <= BREAK_SLACK), len(line))
            lines.append("".join(line[:cut]).rstrip())
            line = line[cut:]
            while line and line[0].isspace():
                line = line[1:]
            if line or not unit.isspace():
                line.append(unit)
        else:
            line.append(unit)
    if "".join(line).strip():
        lines.append("".join(line).rstrip())
    return lines


def wrap_to(text: str, columns: int, count: int) -> Optional[List[str]]:
    """``text`` in exactly ``count`` lines of at most ``columns`` columns, as even as they come; None if it cannot."""
    for narrower in range(columns, 9, -1):
        lines = wrap(text, narrower)
        if len(lines) > count:
            return None
        if len(lines) == count:
            return lines
    return None


# -- the copy -----------------------------------------------------------------------


def docstring_tokens(tokens: List[tokenize.TokenInfo]) -> List[tokenize.TokenInfo]:
    """The docstrings: a string that is a whole statement, first in the file or in an indented block."""
    found = []
    significant = [tok for tok in tokens if tok.type not in (tokenize.NL, tokenize.COMMENT)]
    for index, tok in enumerate(significant):
        if tok.type != tokenize.STRING:
            continue
        before = significant[index - 1].type if index else None
        after = significant[index + 1].type if index + 1 < len(significant) else None
        if before in (None, tokenize.INDENT, tokenize.ENCODING) and after == tokenize.NEWLINE:
            found.append(tok)
    return found


def docstring_text(literal: str) -> Tuple[str, str]:
    """(quote, text) of a docstring literal written with triple quotes and no prefix."""
    quote = literal[:3]
    if quote not in ('"""', "'''") or not literal.endswith(quote):
        raise ValueError(f"not a plain triple-quoted docstring: {literal[:40]!r}")
    return quote, literal[3:-3]


def translate(source: str, table: Dict[str, str], name: str = "<script>") -> str:
    """The Chinese copy of ``source``: its comments and docstrings looked up in ``table``."""
    lines = source.split("\n")
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    missing: List[str] = []
    too_long: List[str] = []
    # (first row, last row, replacement lines); rows are 1-based and inclusive.
    edits: List[Tuple[int, int, List[str]]] = []

    for tok in docstring_tokens(tokens):
        quote, text = docstring_text(tok.string)
        indent = " " * tok.start[1]
        english = "\n".join(line[len(indent):] if line.startswith(indent) else line
                            for line in text.split("\n")).strip("\n")
        chinese = table.get(english)
        if chinese is None:
            missing.append(english)
            continue
        body = chinese.split("\n")
        if len(body) != len(english.split("\n")):
            too_long.append(f"line {tok.start[0]}: the docstring {body[0]!r} has {len(body)} lines, "
                            f"the English {len(english.split(chr(10)))}")
            continue
        new = [f"{indent}{quote}{body[0]}"] + [indent + line if line else "" for line in body[1:]]
        if text.rstrip(" ").endswith("\n"):          # the closing quotes on a line of their own
            new.append(f"{indent}{quote}")
        else:
            new[-1] += quote
        edits.append((tok.start[0], tok.end[0], new))

    comments = [tok for tok in tokens if tok.type == tokenize.COMMENT]
    index = 0
    while index < len(comments):
        tok = comments[index]
        row, column = tok.start
        text = tok.string[1:].strip()
        if CODE_COMMENT.match(text) or not re.search("[A-Za-z]", text):
            index += 1
            continue
        if lines[row - 1][:column].strip():          # after code on its line
            chinese = table.get(key(text))
            if chinese is None:
                missing.append(text)
            else:
                edits.append((row, row, [lines[row - 1][:column] + "# " + chinese]))
            index += 1
            continue
        group = [tok]                                  # a block: the comment lines that follow at this column
        while (index + len(group) < len(comments)
               and comments[index + len(group)].start == (group[-1].start[0] + 1, column)
               and not CODE_COMMENT.match(comments[index + len(group)].string[1:].strip())
               and not lines[group[-1].start[0]][:column].strip()):
            group.append(comments[index + len(group)])
        english = key(" ".join(item.string[1:] for item in group))
        chinese = table.get(english)
        if chinese is None:
            missing.append(english)
        else:
            prefix = " " * column + "# "
            wrapped = wrap_to(chinese, WIDTH - width(prefix), len(group))
            if wrapped is None:
                too_long.append(f"line {row}: {chinese!r} in {len(group)} lines of the English's width")
            else:
                edits.append((row, group[-1].start[0], [prefix + line for line in wrapped]))
        index += len(group)

    if missing:
        raise KeyError(f"{name}: no translation for: " + "; ".join(repr(text) for text in missing))
    if too_long:
        raise ValueError(f"{name}: a translation that does not fit: " + "; ".join(too_long))
    for first, last, new in sorted(edits, reverse=True):
        lines[first - 1:last] = new
    return "\n".join(lines)


def copy_path(script: Path) -> Path:
    return ZH / script.name


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a copy is out of date")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = read_table()
    stale = []
    for script in scripts():
        try:
            text = translate(script.read_text(encoding="utf-8"), table, script.name)
        except (KeyError, ValueError) as error:
            log.error("%s", error.args[0])
            return 2
        target = copy_path(script)
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(target)
        if not options.check:
            target.write_text(text, encoding="utf-8")
            log.info("wrote %s", target.relative_to(HERE))
    if options.check and stale:
        log.error("out of date: %s (run python zh_copies.py)", ", ".join(str(p.relative_to(HERE)) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
