"""``python -m asyncore_fwd.trace SCRIPT [ARGS...]``."""

from ._runner import main

if __name__ == "__main__":
    raise SystemExit(main())
