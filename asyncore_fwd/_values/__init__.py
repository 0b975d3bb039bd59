"""The values layer: what a rule is, and how it is read from flags and config files.

The readers of single values -- numbers, seconds, sizes, host:port -- that every
place taking one uses (``_parse``), ``Rule`` and its defaults (``_rules``), the
TOML config file and ``-L`` specs (``_config``).
"""
