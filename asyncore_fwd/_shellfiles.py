"""The man page and the bash and zsh completions, made from ``build_parser()``.

Generated when a wheel is built (``setup.py`` runs :func:`write_all`), so the
options cannot drift from ``--help`` and nothing generated is kept in the
repository.  ``python -m asyncore_fwd._shellfiles DIR`` writes them under DIR
(for an editable install, which gets no data files, or a distribution's package).

The two libraries are build requirements, never run-time ones:
``argparse-manpage`` for the man page (it reads the parser's groups and help
as they are) and ``shtab`` for the completions (bash and zsh from one parser,
with choices and file names, and no hook in the program, unlike argcomplete).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from typing import Dict, List, Tuple

import shtab
from argparse_manpage.manpage import Manpage

from . import __version__
from .cli import PROG, build_parser

#: Where each file goes, under the installation prefix (``sys.prefix`` for a
#: venv), and its name there: where man, bash-completion and zsh look.
INSTALL_PATHS: Dict[str, Tuple[str, str]] = {
    "man": ("share/man/man1", f"{PROG}.1"),
    "bash": ("share/bash-completion/completions", PROG),
    "zsh": ("share/zsh/site-functions", f"_{PROG}"),
}

#: Options whose value is a file name: completed as one.
_FILE_OPTIONS = ("--config", "--pidfile")


def _roff(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, as the library does."""
    return text.replace("\\", "\\\\").replace("-", "\\-")


def _epilog_sections(epilog: str) -> List[Tuple[str, str]]:
    """``--help``'s epilog cut at its ``title:`` lines: (title, body), bodies dedented."""
    sections: List[Tuple[str, str]] = []
    for block in re.split(r"^(?=\S[^\n]*:\n)", epilog, flags=re.MULTILINE):
        if block.strip():
            title, _, body = block.partition(":\n")
            sections.append((title, textwrap.dedent(body).strip("\n")))
    return sections


def man_page(parser: argparse.ArgumentParser | None = None) -> str:
    """The man page, in roff, of ``parser`` (by default the command's own)."""
    parser = parser or build_parser()
    epilog = parser.epilog or ""
    parser.epilog = None  # its parts become sections of their own, not one "COMMENTS"
    page = Manpage(parser)
    page.source = f"{PROG} {__version__}"
    page.manual = "User Commands"
    page.description = (parser.description or "").rstrip(".")
    page.description = page.description[:1].lower() + page.description[1:]
    # The usage has one line per form; the library would run them together.  It also
    # leaves -h out of the options, so a last form names the flags that print and exit.
    usage = parser.format_usage().split(":", 1)[1]
    forms = [line.split(None, 1) for line in textwrap.dedent(usage).strip().splitlines()]
    exits = [option for action in parser._actions if isinstance(action, (argparse._HelpAction, argparse._VersionAction))
             for option in action.option_strings]
    forms.append([parser.prog, " | ".join(exits)])
    page.add_section("synopsis", "=", "\n.br\n".join(f".B {_roff(prog)}\n{_roff(rest)}" for prog, rest in forms))
    for title, body in _epilog_sections(epilog % {"prog": parser.prog}):
        page.add_section(title, "=", f".nf\n{page.format_text(body)}\n.fi")  # laid out by hand: keep it
    return str(page)


def completion(shell: str, parser: argparse.ArgumentParser | None = None) -> str:
    """The completion script of ``parser`` for ``shell`` ("bash" or "zsh")."""
    parser = parser or build_parser()
    for action in parser._actions:
        if set(action.option_strings) & set(_FILE_OPTIONS):
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        if shell == "zsh" and isinstance(action.metavar, str):
            # shtab puts the metavar in a colon-separated _arguments spec unescaped:
            # the colon of "[HOST:]PORT" would end the field.
            action.metavar = action.metavar.replace(":", "\\:")
    return shtab.complete(parser, shell=shell)


def write_all(directory: str) -> Dict[str, str]:
    """Write the man page and both completions under ``directory``; return {kind: path}."""
    paths = {}
    for kind, (subdirectory, name) in INSTALL_PATHS.items():
        path = os.path.join(directory, subdirectory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = man_page() if kind == "man" else completion(kind)
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
        paths[kind] = path
    return paths


if __name__ == "__main__":
    for written in write_all(sys.argv[1] if len(sys.argv) > 1 else ".").values():
        print(written)
