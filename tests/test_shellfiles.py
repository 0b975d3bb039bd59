"""The man page and the bash and zsh completions: made from the parser, so they match ``--help``.

Each is generated from the current ``build_parser()`` here, as a wheel build
does; one test builds a wheel (without build isolation, from a copy of the
sources) and checks that the three files are in it where man and the shells
look.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List, Set

import pytest

from asyncore_fwd import cli
from conftest import ROOT

shellfiles = pytest.importorskip("asyncore_fwd._shellfiles", reason="needs argparse-manpage and shtab (the test extra)")

PROG = "asyncore-fwd"


def help_options(capsys: pytest.CaptureFixture[str]) -> Set[str]:
    """Every option that ``--help`` lists (its text before the epilog)."""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    listed = text[:text.index("\nexamples:")]
    return set(re.findall(r"(?:^|[\s,\[(])(--?[A-Za-z][\w-]*)", listed, re.MULTILINE))


def test_help_options_are_every_option_of_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    """The options read from --help are the parser's, so the checks below miss none."""
    parser_options = {option for action in cli.build_parser()._actions for option in action.option_strings}
    assert help_options(capsys) == parser_options


def test_man_page_has_every_option_of_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Each option in --help is in the man page (once roff's escapes are undone)."""
    text = re.sub(r"\\f[BIRP]|\\[,/]", "", shellfiles.man_page()).replace("\\-", "-")
    missing = [option for option in help_options(capsys) if not re.search(rf"(?<![\w-]){option}(?![\w-])", text)]
    assert not missing, missing


def test_man_page_has_every_usage_form_and_the_epilog_sections() -> None:
    """The synopsis has one line per usage form; examples, signals and exit status are sections."""
    page = shellfiles.man_page()
    synopsis = page[page.index(".SH SYNOPSIS"):page.index(".SH DESCRIPTION")]
    forms = cli.build_parser().format_usage().count(PROG)
    assert synopsis.count(f".B {PROG}".replace("-", "\\-")) == forms + 1  # and -h | --help | --version
    for section in ("EXAMPLES", "SIGNALS", "EXIT STATUS"):
        assert f".SH {section}\n" in page, section
    assert "SIGHUP" in page[page.index(".SH SIGNALS"):]


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_man_page_renders_without_groff_warnings(tmp_path: Path) -> None:
    """groff reads the page with every warning on, and the text names the command."""
    path = tmp_path / f"{PROG}.1"
    path.write_text(shellfiles.man_page(), encoding="utf-8")
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(path)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "forward TCP connections" in done.stdout


def bash_option_strings(script: str) -> Set[str]:
    (line,) = re.findall(r"^_shtab_asyncore_fwd_option_strings=\((.*)\)$", script, re.MULTILINE)
    return set(line.split())


def test_bash_completion_offers_every_option_of_help(capsys: pytest.CaptureFixture[str]) -> None:
    """The bash script's list of options is exactly --help's."""
    assert bash_option_strings(shellfiles.completion("bash")) == help_options(capsys)


def test_zsh_completion_describes_every_option_of_help(capsys: pytest.CaptureFixture[str]) -> None:
    """The zsh script has an _arguments spec for each option in --help."""
    script = shellfiles.completion("zsh")
    specs = script[script.index("_shtab_asyncore_fwd_options=("):]
    missing = [option for option in help_options(capsys)
               if not re.search(rf'[{{,"*)]{re.escape(option)}[,}}\["]', specs)]
    assert not missing, missing


def test_zsh_completion_escapes_the_colon_of_a_metavar() -> None:
    """--metrics [HOST:]PORT: an unescaped colon would end the spec's field ("command not found: ]PORT")."""
    script = shellfiles.completion("zsh")
    (spec,) = [line for line in script.splitlines() if '"--metrics[' in line]
    assert spec.endswith(r']:[HOST\:]PORT:"')


def complete_in_bash(script: Path, words: List[str]) -> List[str]:
    """What the bash completion function offers for the last of ``words``."""
    line = " ".join(words)
    program = (f'source "$1"; COMP_WORDS=({" ".join(repr(word) for word in words)}); '
               f'COMP_CWORD={len(words) - 1}; COMP_LINE={line!r}; COMP_POINT={len(line)}; '
               f'_shtab_asyncore_fwd; printf "%s\\n" "${{COMPREPLY[@]}}"')
    done = subprocess.run(["bash", "--norc", "-c", program, "bash", str(script)], capture_output=True, text=True,
                          timeout=30, check=True)
    return done.stdout.split()


@pytest.mark.parametrize("words, offered", [
    ([PROG, "--lo"], ["--local-ip", "--local-port", "--log-format", "--loop"]),
    ([PROG, "--loop", ""], ["auto", "epoll", "poll", "select"]),
    ([PROG, "--log-format", ""], ["json", "text"]),
])
def test_bash_completion_completes_options_and_choices(words: List[str], offered: List[str], tmp_path: Path) -> None:
    """Sourced into bash, the function completes option names and an option's choices."""
    script = tmp_path / PROG
    script.write_text(shellfiles.completion("bash"), encoding="utf-8")
    assert sorted(complete_in_bash(script, words)) == offered


def test_bash_completion_completes_a_config_file_name(tmp_path: Path) -> None:
    """-c takes a file name: the file in the directory is offered."""
    script = tmp_path / PROG
    script.write_text(shellfiles.completion("bash"), encoding="utf-8")
    (tmp_path / "fwd.toml").write_text("", encoding="utf-8")
    assert complete_in_bash(script, [PROG, "-c", str(tmp_path / "fw")]) == [str(tmp_path / "fwd.toml")]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_zsh_completion_is_valid_zsh(tmp_path: Path) -> None:
    """zsh parses the script (zsh -n)."""
    script = tmp_path / f"_{PROG}"
    script.write_text(shellfiles.completion("zsh"), encoding="utf-8")
    subprocess.run(["zsh", "-n", str(script)], timeout=30, check=True)


def test_wheel_installs_the_man_page_and_completions_under_share(tmp_path: Path) -> None:
    """A wheel built from the sources carries the three files as data, where man and the shells look."""
    pytest.importorskip("setuptools", reason="builds a wheel without build isolation")
    source = tmp_path / "source"
    shutil.copytree(ROOT / "asyncore_fwd", source / "asyncore_fwd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], timeout=300, check=True)
    (wheel,) = (tmp_path / "dist").glob("asyncore_fwd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        data = {name.split(".data/data/", 1)[1]: archive.read(name).decode()
                for name in archive.namelist() if ".data/data/" in name}
    assert sorted(data) == [f"share/bash-completion/completions/{PROG}", f"share/man/man1/{PROG}.1",
                            f"share/zsh/site-functions/_{PROG}"]
    assert data[f"share/bash-completion/completions/{PROG}"] == shellfiles.completion("bash")
    assert data[f"share/zsh/site-functions/_{PROG}"].startswith(f"#compdef {PROG}\n")
    assert data[f"share/man/man1/{PROG}.1"].startswith(f".TH {PROG.upper()}".replace("-", "\\-"))
