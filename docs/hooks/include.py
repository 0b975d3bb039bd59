"""MkDocs hook: show the project's real code in the pages, never a copy.

A line that is exactly one of these HTML comments becomes a fenced code block
(paths are relative to the repository root):

    <!-- include: PATH -->                 the whole file
    <!-- include: PATH#Qualified.name -->  one class, function, method or assignment
    <!-- diff: OLD_PATH NEW_PATH -->       ``diff -u OLD NEW``
    <!-- cli-help -->                      ``asyncore-fwd --help``
    <!-- output: ID -->                    what the real code prints (a text block)

and, anywhere inside a line, ``<!-- count: stepNN -->`` becomes the counts of
``pytest tests/test_lessons.py -k stepNN`` ("1 passed, 17 xfailed").

**Output blocks.**  An output a page shows is never typed in: the page has
``<!-- output: ID -->`` where the block goes, and ID names a recipe in
examples/lessons/outputs.py, which runs the step (its tests, a scripted
client, race.py for a rate, cpu.py) and prints the output made stable (ports,
addresses, paths, durations replaced).  To add one, write a function there
that returns the text, register it with ``@recipe("ID")`` (check it with
``python examples/lessons/outputs.py ID``), and put the directive on the
page; the same ID serves the English and the Chinese page.  The recipes run
in a child process with this interpreter (it needs pytest), once per ID and
build; a recipe that fails fails the build.  ``expand()`` runs them only when
asked (``run_outputs=True``, as the build does); otherwise it checks that the
ID names a recipe and puts a placeholder, so that the tests that resolve
every page stay quick.  tests/test_lesson_pages.py checks that every
directive names a recipe and runs the quick ones.

A missing file or symbol fails the build, naming the page and the line.
The functions below are plain Python so that the tests can run them without
MkDocs; only ``on_page_markdown`` talks to MkDocs.
"""

from __future__ import annotations

import ast
import difflib
import functools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Optional

#: A directive line: the whole line is the comment (indentation is kept).
DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)<!--\s*(?P<name>include|diff|cli-help|output)\b(?P<args>.*?)-->[ \t]*$")
#: The counts of a step's lesson tests, inside a line.
COUNT = re.compile(r"<!--\s*count:\s*(?P<step>step\d\d)\s*-->")
#: The registry of the output recipes, relative to the repository root.
OUTPUTS = "examples/lessons/outputs.py"
#: The start or end of a fenced block: directives inside one are shown as they are.
FENCE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})")
LANGUAGES = {".py": "python", ".diff": "diff", ".patch": "diff", ".sh": "bash", ".toml": "toml",
             ".yml": "yaml", ".yaml": "yaml", ".json": "json", ".md": "markdown", ".ini": "ini"}
#: Width of the rendered ``--help``, so the page does not depend on the terminal that built it.
HELP_WIDTH = 80


class DirectiveError(Exception):
    """A directive names a file or symbol that does not exist, or is malformed."""


def language_for(path: str) -> str:
    """The code-block language for a file, by its extension (``text`` if unknown)."""
    return LANGUAGES.get(Path(path).suffix, "text")


def read_source(root: Path, relative: str) -> str:
    """The text of ``relative`` under ``root``; a path leaving the root is refused."""
    path = (root / relative).resolve()
    if root.resolve() not in path.parents:
        raise DirectiveError(f"{relative}: not inside the repository")
    if not path.is_file():
        raise DirectiveError(f"{relative}: no such file")
    return path.read_text(encoding="utf-8")


def extract_symbol(source: str, qualname: str, filename: str = "<source>") -> str:
    """The source of ``qualname`` (``Class.method``...), decorators and docstring included, dedented."""
    body: List[ast.stmt] = ast.parse(source, filename).body
    node: Optional[ast.stmt] = None
    for part in qualname.split("."):
        node = next((child for child in body if _defines(child, part)), None)
        if node is None:
            raise DirectiveError(f"{filename}: no {part!r} in {qualname!r}")
        body = node.body if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else []
    assert node is not None and node.end_lineno is not None
    first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
    lines = source.splitlines()[first - 1:node.end_lineno]
    return textwrap.dedent("\n".join(lines))


def _defines(node: ast.stmt, name: str) -> bool:
    """Whether ``node`` is the definition of ``name``: a def, a class or an assignment."""
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(target, ast.Name) and target.id == name for target in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def unified_diff(old_text: str, new_text: str, old_name: str, new_name: str) -> str:
    """What ``diff -u OLD NEW`` prints (without timestamps)."""
    lines = difflib.unified_diff(old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                                 old_name, new_name)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def cli_help() -> str:
    """``asyncore-fwd --help`` as argparse prints it, at a fixed width."""
    from asyncore_fwd.cli import build_parser

    parser = build_parser()
    parser.formatter_class = functools.partial(parser.formatter_class, width=HELP_WIDTH)  # type: ignore[assignment]
    return parser.format_help()


@functools.lru_cache(maxsize=None)
def recipe_output(root: Path, recipe_id: str) -> str:
    """What ``examples/lessons/outputs.py ID`` prints: once per ID and build, shared by both languages."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
               PYTHONDONTWRITEBYTECODE="1")
    try:
        done = subprocess.run([sys.executable, str(root / OUTPUTS), recipe_id], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise DirectiveError(f"output {recipe_id}: no result within 600 s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        raise DirectiveError(f"output {recipe_id}: {OUTPUTS} failed: {last}")
    return done.stdout.rstrip("\n")


@functools.lru_cache(maxsize=None)
def recipe_ids(root: Path) -> frozenset:
    """The IDs ``examples/lessons/outputs.py --list`` knows."""
    return frozenset(recipe_output(root, "--list").split())


def output_of(root: Path, recipe_id: str, run_outputs: bool) -> str:
    """What the recipe prints, or (without ``run_outputs``) a placeholder once its ID is known."""
    if run_outputs:
        return recipe_output(root, recipe_id)
    if recipe_id not in recipe_ids(root):
        raise DirectiveError(f"output {recipe_id}: no such recipe in {OUTPUTS}")
    return f"(the output of {recipe_id})"


def fenced(code: str, language: str) -> str:
    """``code`` as a fenced block, with a fence longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`{3,}", code)), default=2)
    fence = "`" * (longest + 1)
    lines = [f"{fence}{language}", *code.rstrip("\n").splitlines(), fence]
    return "\n".join(lines)


def render_directive(name: str, args: str, root: Path, run_outputs: bool = False) -> str:
    """The code block for one directive (without indentation)."""
    words = args.split()
    if name == "cli-help":
        if words:
            raise DirectiveError("cli-help takes no argument")
        return fenced(cli_help(), "text")
    if name == "output":
        if len(words) != 1:
            raise DirectiveError("output takes one recipe: <!-- output: ID -->")
        return fenced(output_of(root, words[0], run_outputs), "text")
    if name == "diff":
        if len(words) != 2:
            raise DirectiveError("diff takes two paths: <!-- diff: OLD NEW -->")
        old, new = words
        return fenced(unified_diff(read_source(root, old), read_source(root, new), old, new), "diff")
    if len(words) != 1:
        raise DirectiveError("include takes one path: <!-- include: PATH --> or <!-- include: PATH#Name -->")
    path, _, qualname = words[0].partition("#")
    source = read_source(root, path)
    if qualname:
        source = extract_symbol(source, qualname, path)
    return fenced(source, language_for(path))


def expand(markdown: str, root: Path, page: str = "<page>", run_outputs: bool = False) -> str:
    """``markdown`` with every directive line replaced by its code block (outputs: see the module's doc)."""
    out = []
    open_fence = ""
    for number, line in enumerate(markdown.split("\n"), 1):
        fence = FENCE.match(line)
        if fence:
            marker = fence.group("fence")
            if not open_fence:
                open_fence = marker
            elif marker[0] == open_fence[0] and len(marker) >= len(open_fence) and not line.strip()[len(marker):]:
                open_fence = ""
        match = None if open_fence or fence else DIRECTIVE.match(line)
        if match is None:
            if not open_fence and not fence and COUNT.search(line):
                try:
                    line = COUNT.sub(lambda count: output_of(root, f"counts-{count.group('step')}", run_outputs),
                                     line)
                except DirectiveError as error:
                    raise DirectiveError(f"{page}, line {number}: {error}") from None
            out.append(line)
            continue
        args = match.group("args").strip()
        if args.startswith(":"):
            args = args[1:]
        try:
            block = render_directive(match.group("name"), args, root, run_outputs)
        except (DirectiveError, SyntaxError) as error:
            raise DirectiveError(f"{page}, line {number}: {line.strip()}: {error}") from None
        out.append(fenced_indent(block, match.group("indent")))
    return "\n".join(out)


def fenced_indent(block: str, indent: str) -> str:
    """Indent a rendered block like the directive was (inside a list item, say)."""
    return "\n".join(indent + line if line else line for line in block.split("\n"))


# -- MkDocs ------------------------------------------------------------------


def on_page_markdown(markdown: str, page, config, files) -> str:  # type: ignore[no-untyped-def]
    from mkdocs.exceptions import PluginError

    root = Path(config["config_file_path"]).resolve().parent
    try:
        return expand(markdown, root, page.file.src_uri, run_outputs=True)
    except DirectiveError as error:
        raise PluginError(f"code include: {error}") from None
