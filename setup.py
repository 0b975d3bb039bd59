"""The build step pyproject.toml cannot say: the man page and the shell completions.

When a wheel is built (``pip install .``, ``pip install -e .``, ``python -m
build``), ``build_shellfiles`` makes ``asyncore-fwd.1`` and the bash and zsh
completions from the argparse parser (``asyncore_fwd/_shellfiles.py``) and
installs them as data files under the prefix: ``share/man/man1``,
``share/bash-completion/completions`` and ``share/zsh/site-functions``.
Everything else about the package is in pyproject.toml.
"""

import os
import sys
from typing import Dict, List, Optional

from setuptools import Command, setup
from setuptools.command.build import build

ROOT = os.path.dirname(os.path.abspath(__file__))


class build_shellfiles(Command):
    """Generate the man page and the completions, and make them the package's data files."""

    description = "generate the man page and the bash and zsh completions from the argparse parser"
    user_options: List[tuple] = []

    def initialize_options(self) -> None:
        self.build_temp: Optional[str] = None
        self.editable_mode = False  # set by setuptools for pip install -e

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_temp", "build_temp"))

    def run(self) -> None:
        if self.editable_mode:
            # setuptools installs no data files in an editable install: do not make them.
            self.announce("editable install: no man page or completions "
                          "(python -m asyncore_fwd._shellfiles DIR makes them)", level=2)
            return
        sys.path.insert(0, ROOT)  # the package being built, not an installed one
        from asyncore_fwd._shellfiles import write_all

        directory = os.path.join(self.build_temp, "shellfiles")
        paths = write_all(directory).values()
        # Set here rather than in setup(): the files exist only once this has run.
        self.distribution.data_files = [(os.path.relpath(os.path.dirname(path), directory), [path])
                                        for path in paths]

    # What setuptools asks of a build step (sdist, editable installs): no sources of
    # their own, and nothing that goes into the package's directory.
    def get_source_files(self) -> List[str]:
        return []

    def get_outputs(self) -> List[str]:
        return []

    def get_output_mapping(self) -> Dict[str, str]:
        return {}


class Build(build):
    sub_commands = build.sub_commands + [("build_shellfiles", None)]


setup(cmdclass={"build": Build, "build_shellfiles": build_shellfiles})
