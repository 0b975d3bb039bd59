"""The scripts in ``examples/`` run as documented, warnings as errors."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from typing import Callable

import pytest

from conftest import ROOT, WAIT, ForwarderProcess

EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error", str(EXAMPLES / name), *args],
                          capture_output=True, text=True, timeout=3 * WAIT)


def test_embed_example_prints_the_page_fetched_through_the_forwarder() -> None:
    """examples/embed.py fetches its page twice (own thread, own loop), prints it, exits 0."""
    result = run_example("embed.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello from behind the forwarder.\n" * 2
    assert result.stderr == ""


def test_udp_example_prints_each_datagram_back_whole_from_the_address_sent_to() -> None:
    """examples/udp_relay.py sends three datagrams (one empty) through a UDP rule, prints them back,
    sees the session idle out, exits 0."""
    result = run_example("udp_relay.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("b'hello' from the address sent to: True\n"
                             "b'' from the address sent to: True\n"
                             "b'bye' from the address sent to: True\n"
                             "sessions=1 open=0 datagrams_to_server=3\n")
    assert result.stderr == ""


@pytest.mark.article
def test_article_help_describes_the_remote_ip_as_a_local_address() -> None:
    """The article's --help works, and its -r help is its wrong text (defect 8)."""
    result = run_example("article_forwarder.py", "--help")
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())  # however optparse wrapped it
    assert "-r REMOTE_IP, --remote-ip=REMOTE_IP Local IP address to bind to" in help_text


def test_retry_example_runs_with_the_installed_pytest_plugin() -> None:
    """examples/test_client_retries.py passes under pytest, using the plugin's fixture as a user would."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(EXAMPLES / "test_client_retries.py")],
                            capture_output=True, text=True, timeout=6 * WAIT, cwd=EXAMPLES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


#: Where examples/fwd.toml listens.
EXAMPLE_LISTENS = [(socket.AF_INET, "0.0.0.0", 8080), (socket.AF_INET6, "::1", 5433)]


@pytest.fixture
def example_ports_free() -> None:
    """Skip if something here holds a port examples/fwd.toml listens on (it would fail, rightly)."""
    for family, host, port in EXAMPLE_LISTENS:
        try:
            with socket.socket(family) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as error:
            pytest.skip(f"cannot bind [{host}]:{port} here: {error.strerror}")


def test_example_config_checks_and_the_readme_shows_it_as_it_is(example_ports_free: None) -> None:
    """examples/fwd.toml passes --check-config (which resolves and binds as a start does); the README
    shows that file and that output, unchanged."""
    config = EXAMPLES / "fwd.toml"
    result = subprocess.run([sys.executable, "-m", "asyncore_fwd", "-c", str(config), "--check-config"],
                            capture_output=True, text=True, timeout=3 * WAIT)
    assert result.returncode == 0, result.stderr
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    body = config.read_text(encoding="utf-8").split("\n\n", 1)[1]  # after the comment heading
    assert f"```toml\n{body}```" in readme
    for line in result.stdout.splitlines():
        assert f"    {line}\n" in readme


def test_example_config_runs_as_shipped(example_ports_free: None, spawn: Callable[..., ForwarderProcess]) -> None:
    """A newcomer's first run: examples/fwd.toml starts both rules as it is, and stops with status 0."""
    proc = spawn([sys.executable, "-m", "asyncore_fwd", "-c", str(EXAMPLES / "fwd.toml")])
    proc.wait_line(r"INFO web: forwarding 0\.0\.0\.0:8080 to localhost:80$")
    proc.wait_line(r"INFO db: forwarding \[::1\]:5433 to \[2001:db8::5\]:5432$")
    assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert " ERROR " not in proc.stderr
