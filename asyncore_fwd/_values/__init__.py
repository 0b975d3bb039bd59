"""The values layer: what a rule is, and how it is read from flags and config files.

``Rule`` and its defaults (``_rules``), the TOML config file and ``-L`` specs (``_config``).
"""
