"""The ``asyncore-fwd`` command: argument parsing, logging set-up, signals.

Kept apart from the library: nothing here is needed to embed a ``Forwarder``
or a ``Service``.  The rules come from the article's one-rule flags
(``-l -p -r -P``), or from any number of ``-L`` flags and a config file
(``-c``); ``_config`` parses those.  Exit status: 0 after SIGINT/SIGTERM, 1
for a run-time error (address in use, permission denied, unknown host), 2
for bad usage or a bad config.

One module per job: the parser and its help (``_parser``), the logs
(``_logging``), the rules from the flags (``_rules``), ``main()`` and
``--check-config`` (``_main``), serving and the workers (``_run``) and the
signal handlers while serving (``_signals``).
"""

from ._logging import JsonFormatter
from ._main import main
from ._parser import DEFAULT_DRAIN_TIMEOUT, EPILOG, PROG, build_parser
from ._rules import load_rules

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "EPILOG", "PROG", "JsonFormatter", "build_parser", "load_rules", "main"]
