"""CPython's own asyncore and asynchat test suites, run with ``asyncore_fwd.loop``.

The judge of "drop-in": ``test.test_asyncore`` and ``test.test_asynchat``
from the interpreter's standard library, with ``asyncore.loop`` replaced by
``asyncore_fwd.loop`` bound to one backend, pass on every backend.

Each suite runs with ``unittest`` in a child interpreter: a hang is cut by a
timeout (after a dump of every thread's stack), and the suites' temporary files (``os_helper.TESTFN``, in the
current directory) and leftovers in asyncore's global map stay out of this
process.  Python 3.12 and later have neither asyncore nor these suites in the
standard library, so the tests are skipped there.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from asyncore_fwd._eventloop._loop import LOOP_KINDS

SUITES = ("test.test_asyncore", "test.test_asynchat")
SUITE_TIMEOUT = 40.0  # seconds for one suite on one backend; each takes about 2

# The child: import the suite, check it uses the asyncore module we patch,
# swap asyncore.loop for ours on the backend named by argv[2] (the suites look
# it up at call time), run the suite, print unittest's report, the skips and
# every exception that escaped a thread (unittest itself does not see those).
# After argv[3] seconds it prints every thread's stack and exits.
CHILD = r"""
import faulthandler, functools, importlib, sys, threading, unittest, warnings
import asyncore_fwd
from asyncore_fwd._compat import asyncore

name, kind, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
faulthandler.dump_traceback_later(timeout, exit=True, file=sys.stdout)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    suite_module = importlib.import_module(name)
if suite_module.asyncore is not asyncore:
    sys.exit(f"{name} tests another asyncore module than the one patched")
asyncore.loop = functools.partial(asyncore_fwd.loop, kind=kind)

running = ["(no test)"]
class Result(unittest.TextTestResult):
    def startTest(self, test):
        running[0] = test.id()
        super().startTest(test)
def record_thread_exception(args, default_hook=threading.excepthook):
    print(f"\nTHREAD EXCEPTION in {running[0]}: {args.exc_type.__name__}: {args.exc_value}")
    default_hook(args)
threading.excepthook = record_thread_exception

tests = unittest.defaultTestLoader.loadTestsFromModule(suite_module)
result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2, resultclass=Result).run(tests)
for test, reason in result.skipped:
    print(f"SKIPPED {test.id()}: {reason}")
print(f"RAN {result.testsRun} FAILED {len(result.failures) + len(result.errors)} SKIPPED {len(result.skipped)}")
sys.exit(0 if result.wasSuccessful() else 1)
"""


def has_suite(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # no "test" package at all (some distributions split it out)
        return False


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("suite", SUITES)
def test_cpython_suite_passes_with_our_loop_in_place_of_asyncores(suite: str, kind: str, tmp_path: Path) -> None:
    """The suite passes, with no exception escaping a thread, when ``asyncore.loop`` is ours on ``kind``."""
    if not has_suite(suite):
        pytest.skip(f"{suite} is not in this Python's standard library "
                    f"(asyncore and its tests were removed in 3.12)")
    try:
        child = subprocess.run([sys.executable, "-c", CHILD, suite, kind, str(SUITE_TIMEOUT)],
                               cwd=tmp_path, capture_output=True, text=True, timeout=SUITE_TIMEOUT + 10)
    except subprocess.TimeoutExpired:  # the child's own timeout did not fire: stuck in C
        pytest.fail(f"{suite} on the {kind} loop did not finish within {SUITE_TIMEOUT + 10} s")
    assert child.returncode == 0, f"{suite} on the {kind} loop failed:\n{child.stdout}\n{child.stderr}"
    thread_exceptions = [line for line in child.stdout.splitlines()
                         if line.startswith("THREAD EXCEPTION") and not is_poll_hangup_in_quick_connect(line, kind)]
    assert not thread_exceptions, "\n".join(thread_exceptions) + "\n" + child.stderr


def is_poll_hangup_in_quick_connect(report: str, kind: str) -> bool:
    """The one thread exception asyncore's own poll loop raises in these suites.

    ``test_quick_connect`` runs the loop in a thread while a client connects
    and resets at once; its handler raises in ``handle_close``.  The test is
    written for asyncore's select loop (readable, nothing read); poll and
    epoll report the reset as a hang-up, which ``asyncore.readwrite`` turns
    into ``handle_close``: ``asyncore.loop(use_poll=True)`` raises it too.
    """
    return (kind != "select" and ".test_quick_connect:" in report
            and "handle_close not supposed to be called" in report)
