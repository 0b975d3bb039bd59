"""What the lesson pages show as output, produced by running the real code.

    python examples/lessons/outputs.py ID      print the output the pages show for ID
    python examples/lessons/outputs.py --list  the IDs

The documentation's build (docs/hooks/include.py) replaces each line
``<!-- output: ID -->`` of a page with what this prints for ID, in a text
block, and ``<!-- count: stepNN -->`` inside a line with the pass and xfail
counts of ``pytest tests/test_lessons.py -k stepNN`` (the recipe
``counts-stepNN``).  So a page cannot show an output that the code no longer
prints: a change to the code changes the page at the next build, and a
recipe that fails fails the build.

``RECIPES`` maps each ID to a function of no argument that returns the text.
The functions run the step the way the page says: its tests with pytest
(``_pytest_outputs``), a trace driven one round at a time (``_scene``), the
script, race.py, cpu.py or an evidence script with real clients (``_runs``).
``normalise`` then replaces what differs from one run to the next: ports the
kernel picked, object addresses, the interpreter's paths, durations, log
times.  Where the outcome itself is a matter of luck, the recipe measures a
rate (race.py) instead of showing one run.  To add an output: write the
function, add its ID below, check it with ``python examples/lessons/outputs.py
ID``, and put ``<!-- output: ID -->`` on the page (both languages).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable, Dict, List

LESSONS = Path(__file__).resolve().parent
ROOT = LESSONS.parent.parent
sys.path.insert(0, str(LESSONS))  # the helpers below, race.py and cpu.py, also when this file is loaded by path

import _pytest_outputs as tests  # noqa: E402
import _runs as runs  # noqa: E402
import _scene as scene  # noqa: E402

#: The last lesson step (stepNN_*.py).
LAST_STEP = max(int(path.name[4:6]) for path in LESSONS.glob("step[0-9][0-9]_*.py"))

#: A port the kernel picks (Linux's ephemeral range starts at 32768); the fixed ports of the pages stay.
EPHEMERAL = r"(?:3276[89]|327[7-9]\d|32[89]\d\d|3[3-9]\d{3}|[45]\d{4}|6[0-5]\d{3})\b"
#: What differs from one run to the next, and what the pages show instead.
UNSTABLE = [
    (re.compile(r"\b(127\.0\.0\.1|::1|localhost):" + EPHEMERAL), r"\1:PORT"),  # ephemeral ports
    (re.compile(r"\bport " + EPHEMERAL), "port PORT"),                               # ... as the logs say them
    (re.compile(r"\bat 0x[0-9a-f]+"), "at 0x..."),                                  # object addresses in reprs
    (re.compile(r"\.\.\.[0-9a-f]*>"), "...>"),                                        # ... cut short by pytest
    (re.compile(r"[^\s\[\]|()<>\"']*/python[23]\.\d+/(site-packages/)?"), ".../"),  # the interpreter's files
    (re.compile(re.escape(str(ROOT)) + "/"), ""),                                    # the checkout
    (re.compile(r" in \d+\.\d+s\b"), ""),                                            # pytest's durations
    (re.compile(r"\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\b"), "YYYY-MM-DD hh:mm:ss,mmm"),  # log times
]


def normalise(text: str) -> str:
    """``text`` with what changes from run to run replaced (see ``UNSTABLE``)."""
    for pattern, replacement in UNSTABLE:
        text = pattern.sub(replacement, text)
    return text


RECIPES: Dict[str, Callable[[], str]] = {}

# -- the lesson tests: counts, the -v listing, the failures the next step fixes --
for _step in range(0, LAST_STEP + 1):
    RECIPES[f"counts-step{_step:02d}"] = lambda step=_step: tests.counts(step)
    RECIPES[f"tests-step{_step:02d}"] = lambda step=_step: tests.verbose(step)
    if _step:
        RECIPES[f"failures-step{_step:02d}"] = lambda step=_step: tests.failures(step)
RECIPES.update({
    "failure-step08-none": lambda: tests.failures(8, "test_keeps_accepting_after_accept_returns_none", captured=True),
    "failure-step08-emfile": lambda: tests.failures(8, "test_pauses_accepting_while_out_of_descriptors",
                                                    captured=True),
    "failure-step10-logged": lambda: tests.failures(10, captured=True),
})

# -- races, as rates; CPU over an interval -------------------------------------
for _step, _scenario in [(0, "curl"), (0, "nc"), (1, "curl"), (1, "nc"), (4, "nc"), (5, "nc"), (6, "nc"),
                         (7, "nc"), (7, "curl"), (5, "big"), (6, "big"), (7, "big")]:
    RECIPES[f"race-step{_step:02d}-{_scenario}"] = lambda step=_step, scenario=_scenario: runs.race_rate(step, scenario)
for _step in (4, 5, 6):
    RECIPES[f"cpu-step{_step:02d}"] = lambda step=_step: runs.cpu_while_waiting(step)

# -- traces, driven round by round ---------------------------------------------
RECIPES.update({
    "trace-step00": lambda: scene.traced(0, [scene.connect, scene.send_request], listener=True),
    "trace-step00-nc-z": lambda: scene.traced(0, [scene.connect, scene.half_close], first=2),
    "trace-step01-nc": lambda: scene.traced(1, scene.HALF_CLOSING_CLIENT),
    "trace-step01-curl": lambda: scene.traced(1, scene.CURL, first=4),
    "trace-step02-download": lambda: scene.traced(2, [scene.connect, scene.send_request, scene.nothing,
                                                      scene.server_sends_big, scene.nothing, scene.nothing,
                                                      scene.nothing], first=5, last=7),
    "trace-step03-limit": lambda: scene.around_first(scene.traced(3, [
        scene.slow_client, scene.send_request, scene.nothing,
        scene.Until(scene.server_keeps_sending, scene.buffer_for_client_full),
        scene.client_reads_some, scene.nothing]), "sender#1 readable() -> False", before=1, after=1),
    "trace-step04-curl": lambda: scene.traced(4, scene.CURL, last=2, listener=True),
    "trace-step05-spin": lambda: scene.traced(5, scene.SLOW_SERVER, first=6, last=7),
    "trace-step05-end": lambda: scene.traced(5, scene.SLOW_SERVER, rounds=lambda number, final: number == final),
    "trace-step06-slow": lambda: scene.traced(6, scene.ANSWER_THEN_FIN, first=3, last=5),
    "trace-step06-fin": lambda: scene.traced(6, scene.ANSWER_THEN_FIN, first=6),
    "trace-step06-together": lambda: scene.traced(6, [scene.connect, scene.send_request, scene.half_close,
                                                      scene.server_answers_and_closes], first=3),
    "trace-step07-fails": lambda: scene.traced(6, scene.BIG_THEN_FIN, first=4),
    "trace-step07-hup": lambda: scene.traced(7, scene.BIG_THEN_FIN, first=4, last=5),
    "trace-step07-end": lambda: scene.traced(7, scene.BIG_THEN_FIN, rounds=lambda number, final: number >= final - 1),
    "trace-step08-pause": lambda: scene.only_rounds(scene.trace_out_of_descriptors(),
                                                    lambda number, final: 3 <= number <= 4),
    "trace-step08-resume": lambda: scene.without_predicates(scene.only_rounds(
        scene.trace_out_of_descriptors(), lambda number, final: number >= final - 2)),
    "trace-step09": lambda: scene.traced(9, [scene.connect, scene.send_request], last=2, logs=True),
    "trace-step10": lambda: scene.traced(10, [scene.connect, scene.send_request], listener=True, logs=True),
    "trace-step10-quiet": lambda: scene.traced(10, [scene.connect, scene.send_request]),
})

# -- the steps run as a reader runs them ----------------------------------------
RECIPES.update({
    "error-step00-python3": lambda: runs.step00_on_python3(),
    "error-step00": lambda: runs.step00_on_python3("-W", "ignore"),
    "asyncore-readwrite": lambda: runs.asyncore_source("readwrite"),
    "copy-cost": lambda: runs.run_python("examples/lessons/copy_cost.py"),
    "timeit-bytes": lambda: runs.run_python("-m", "timeit", "-s", "buf = b'x' * 10_000_000", "buf[4096:]"),
    "timeit-bytearray": lambda: runs.run_python("-m", "timeit", "-s", "buf = bytearray(b'x' * 10_000_000)",
                                                "del buf[:4096]; buf += b'x' * 4096"),
    "memory-steps02-03": runs.memory_table,
    "vmrss-step02": lambda: f"VmRSS:\t{runs.memory_of_a_slow_client(2, 300, 2.0)[1]:8d} kB",
    "vmrss-step03": lambda: f"VmRSS:\t{runs.memory_of_a_slow_client(3, 300, 2.0)[1]:8d} kB",
    "select-limit-step03": lambda: runs.evidence("select_limit.py", "examples/lessons", "step03_backpressure"),
    "select-limit-step04": lambda: runs.evidence("select_limit.py", "examples/lessons", "step04_poll"),
    "many-clients-step03-client": lambda: runs.many_clients(3)[0],
    "many-clients-step03": lambda: runs.many_clients(3)[1],
    "many-clients-step04-client": lambda: runs.many_clients(4)[0],
    "emfile-step07": lambda: runs.emfile_evidence("step07_poll_hangup.py")[0],
    "emfile-step07-log": lambda: runs.emfile_evidence("step07_poll_hangup.py")[1],
    "emfile-step08": lambda: runs.emfile_evidence("step08_accept.py")[0],
    "ulimit8-step07": lambda: runs.three_clients_and_a_fourth(7)[0],
    "ulimit8-step07-fourth": lambda: runs.three_clients_and_a_fourth(7)[1],
    "ulimit8-step08-fourth": lambda: runs.three_clients_and_a_fourth(8)[1],
    "run-step08-refused": lambda: runs.run_script(8, runs.NOBODY),
    "run-step09-refused": lambda: runs.run_script(9, runs.NOBODY),
    "help-step08-remote": lambda: runs.lines_from(runs.script_help(8), "--remote-ip", 4),
    "help-step09": lambda: runs.script_help(9),
})


def main(argv: List[str]) -> int:
    if argv == ["--list"]:
        print("\n".join(sorted(RECIPES)))
        return 0
    if len(argv) != 1 or argv[0] not in RECIPES:
        print(f"usage: outputs.py ID | --list  (unknown: {' '.join(argv)})", file=sys.stderr)
        return 2
    print(normalise(RECIPES[argv[0]]()).rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
