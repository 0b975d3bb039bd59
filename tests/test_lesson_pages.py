"""The lesson pages' outputs come from running the code: the recipes, race.py and cpu.py.

The pages (docs/lessons, docs/zh/lessons, both how-it-works pages) show an
output only through ``<!-- output: ID -->`` and a count only through
``<!-- count: stepNN -->``; the docs build runs the recipe of
examples/lessons/outputs.py each one names.  These tests check that every
directive names a recipe, that the quick recipes give what their pages
explain, that nothing that looks like a typed-in output (a pytest result
line, a count, a rate, ``ps -o %cpu``) is left on a page, and that race.py
and cpu.py print what the pages say they print.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import List

import pytest

from conftest import ROOT, WAIT

LESSONS = ROOT / "examples" / "lessons"
PAGES: List[Path] = sorted([*(ROOT / "docs" / "lessons").glob("*.md"), *(ROOT / "docs" / "zh" / "lessons").glob("*.md"),
                            ROOT / "docs" / "how-it-works.md", ROOT / "docs" / "zh" / "how-it-works.md"])
OUTPUT = re.compile(r"<!--\s*output:\s*(\S+)\s*-->")
COUNT = re.compile(r"<!--\s*count:\s*(step\d\d)\s*-->")
RATE = re.compile(r"^(\d+)/(\d+) replies came back short$")
CPU = re.compile(r"^(\d+)% of one CPU over 1\.0 s$")
#: What a typed-in output looks like on a page's source (outside the directives).
TYPED_IN = {
    "a pytest result line": re.compile(r"^(tests/test_lessons\.py::|FAILED tests/)", re.M),
    "a count": re.compile(r"\b\d+ passed\b"),
    "a rate": re.compile(r"\b\d+ (times )?out of \d+\b|\b\d+/\d+ replies"),
    "a lifetime CPU average": re.compile(r"ps -o %cpu"),
    "a trace line": re.compile(r"^\s*r(\d+|-) +(fd|select|poll|epoll)", re.M),
    "a traceback's E line": re.compile(r"^\s*E   \S", re.M),
    "asyncore's error line": re.compile(r"^\s*error: uncaptured python exception", re.M),
    "a log line": re.compile(r"^\s*\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", re.M),
}


def load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"lesson_{name}", LESSONS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


outputs = load("outputs")


def run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(LESSONS / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_every_output_directive_names_a_recipe() -> None:
    named = {(page.relative_to(ROOT).as_posix(), name) for page in PAGES
             for name in OUTPUT.findall(page.read_text(encoding="utf-8"))}
    assert named, "no output directive on any page"
    assert [(page, name) for page, name in sorted(named) if name not in outputs.RECIPES] == []


def test_every_count_directive_names_a_step() -> None:
    steps = {step for page in PAGES for step in COUNT.findall(page.read_text(encoding="utf-8"))}
    assert steps
    assert sorted(step for step in steps if f"counts-{step}" not in outputs.RECIPES) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_page_types_in_no_output(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    found = {what: pattern.search(text).group(0) for what, pattern in TYPED_IN.items()  # type: ignore[union-attr]
             if pattern.search(text)}
    assert found == {}, "generate it with <!-- output: ID --> or <!-- count: stepNN -->"


def test_normalise_replaces_ports_addresses_paths_and_durations() -> None:
    line = (f"<x connected 127.0.0.1:46462 at 0x7f4fd94eba50> [/usr/lib/python3.11/asyncore.py|read|88] "
            f"[{ROOT}/examples/lessons/step00_article.py|handle_read|42] 1 failed in 0.05s")
    assert outputs.normalise(line) == ("<x connected 127.0.0.1:PORT at 0x...> [.../asyncore.py|read|88] "
                                       "[examples/lessons/step00_article.py|handle_read|42] 1 failed")


def test_counts_are_those_of_the_strict_xfail_table() -> None:
    done = run("outputs.py", "counts-step01")
    assert done.returncode == 0, done.stderr
    passed, xfailed = map(int, re.fullmatch(r"(\d+) passed, (\d+) xfailed\n", done.stdout).groups())  # type: ignore[union-attr]
    assert passed >= 1 and xfailed >= 1
    done = run("outputs.py", f"counts-step{outputs.LAST_STEP:02d}")
    assert re.fullmatch(r"\d+ passed\n", done.stdout), done.stdout + done.stderr


def test_failures_recipe_shows_the_next_steps_test_failing() -> None:
    done = run("outputs.py", "failures-step02")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["E   AssertionError: the rest was copied into a new buffer",
                                        "FAILED tests/test_lessons.py::test_send_consumes_the_buffer_in_place[step01]"]


def test_trace_recipe_shows_the_clients_eof_closing_the_pair_before_the_request_is_sent() -> None:
    done = run("outputs.py", "trace-step01-nc")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["r1 select(timeout=30) -> 1 event: fd3 r", "r1 fd3 forwarder#1 handle_accept()"]
    # Round 3 has both events; the receiver's read of the EOF closes the pair, so the sender never writes.
    round3 = lines[lines.index("r3 select(timeout=30) -> 2 events: fd4 r, fd5 w"):]
    assert "r3   fd4 receiver#1 handle_close()" in round3
    assert round3[-2:] == ["r3     fd4 receiver#1 close()", "r3     fd5 sender#1 close()"]
    assert not any("sender#1 handle_write()" in line for line in lines)


def test_unknown_recipe_is_a_usage_error() -> None:
    done = run("outputs.py", "no-such-output")
    assert done.returncode == 2 and "unknown: no-such-output" in done.stderr


def python27_available() -> bool:
    race = load("race")
    try:
        race.interpreter(0)
    except SystemExit:
        return False
    return True


@pytest.mark.parametrize(("step", "scenario", "never"), [
    pytest.param("00", "curl", False, id="step00-curl"),
    pytest.param("00", "nc", False, id="step00-nc"),
    pytest.param("01", "curl", False, id="step01-curl"),
    pytest.param("01", "nc", False, id="step01-nc"),
    pytest.param("05", "nc", False, id="step05-nc"),
    pytest.param("06", "nc", False, id="step06-nc"),
    pytest.param("07", "nc", True, id="step07-nc"),
    pytest.param("07", "curl", True, id="step07-curl"),
    pytest.param("06", "big", False, id="step06-big"),
    pytest.param("07", "big", True, id="step07-big"),
])
def test_race_prints_how_many_replies_came_back_short(step: str, scenario: str, never: bool) -> None:
    if step == "00" and not python27_available():  # the article's code is Python 2
        pytest.skip("no Python 2.7 for the article's step")
    done = run("race.py", step, scenario, "-n", "3")
    assert done.returncode == 0, done.stderr
    short, runs = map(int, RATE.fullmatch(done.stdout.strip()).groups())  # type: ignore[union-attr]
    assert runs == 3 and 0 <= short <= runs
    if never:
        assert short == 0, f"step {step} fixes this race, yet {short} of {runs} replies came back short"


def test_race_refuses_an_unknown_scenario() -> None:
    done = run("race.py", "01", "telnet")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_cpu_sees_a_spinning_process_busy_and_a_sleeping_one_idle() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        busy, idle = run("cpu.py", str(spinner.pid), timeout=WAIT), run("cpu.py", str(sleeper.pid), timeout=WAIT)
    finally:
        for process in (spinner, sleeper):
            process.kill()
            process.wait()
    busy_share = int(CPU.fullmatch(busy.stdout.strip()).group(1))  # type: ignore[union-attr]
    idle_share = int(CPU.fullmatch(idle.stdout.strip()).group(1))  # type: ignore[union-attr]
    assert busy_share > 10 and idle_share < 5


def test_cpu_of_a_process_that_is_gone_is_one_line_and_exit_2() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    done = run("cpu.py", str(process.pid), timeout=WAIT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and f"process {process.pid}" in done.stderr


def load_hook() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hook_include", ROOT / "docs" / "hooks" / "include.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hook_puts_a_recipes_output_in_a_block_and_a_count_in_the_line() -> None:
    include = load_hook()
    page = "Step 10: <!-- count: step10 -->.\n\n<!-- output: counts-step10 -->\n"
    counted = run("outputs.py", "counts-step10").stdout.strip()
    assert include.expand(page, ROOT, run_outputs=True) == f"Step 10: {counted}.\n\n```text\n{counted}\n```\n"


def test_hook_names_the_page_and_line_of_an_unknown_recipe() -> None:
    include = load_hook()
    for run_outputs in (False, True):
        with pytest.raises(include.DirectiveError, match=r"step99\.md, line 2: .*no-such-output"):
            include.expand("text\n<!-- output: no-such-output -->", ROOT, "step99.md", run_outputs=run_outputs)


def test_hook_checks_an_outputs_name_without_running_it_unless_asked() -> None:
    include = load_hook()
    assert include.expand("<!-- output: race-step01-nc -->", ROOT) == "```text\n(the output of race-step01-nc)\n```"
