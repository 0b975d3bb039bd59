"""Rules from ``-L`` flags and TOML config files: parsing, precedence, and every error in one line.

Everything here runs in-process: ``parse_forward_spec`` and ``load_config``
directly, and ``cli.main`` for the exit status and the exact stderr line.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Iterator, List

import pytest

from asyncore_fwd import Service, cli
from asyncore_fwd._values._config import ConfigError, describe_rule, load_config, parse_forward_spec
from asyncore_fwd._values._parse import parse_size, shorten
from asyncore_fwd.cli import _rules as cli_rules
from conftest import needs_ipv6

PROG = "asyncore-fwd"
KNOWN = ("name, listen, connect, allow, deny, max_connections, max_per_client, connect_timeout, idle_timeout, "
         "half_closed_timeout, backlog, high_water, send_proxy, balance, max_fails, fail_timeout, "
         "health_check_interval, accept_proxy, proto, source, tcp_keepalive")
GOOD_RULE = '[[rule]]\nlisten = "127.0.0.1:8080"\nconnect = "127.0.0.1:80"\n'


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run in a fresh directory, so that messages name ``fwd.toml`` as given; restore the logger.

    A config accepted by mistake would be served until killed: fail instead.
    """
    monkeypatch.chdir(tmp_path)

    def serve_forever(self: Service, *args: object, **kwargs: object) -> None:
        self.close()
        pytest.fail("main() started serving instead of reporting an error")

    monkeypatch.setattr(Service, "serve_forever", serve_forever)
    logger = logging.getLogger("asyncore_fwd")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


def write(text: str, name: str = "fwd.toml") -> str:
    Path(name).write_text(text)
    return name


def run(argv: List[str], capsys: pytest.CaptureFixture[str]) -> tuple:
    """``cli.main(argv)`` as the command runs it: (exit status, stdout, stderr)."""
    try:
        status = cli.main(argv)
    except SystemExit as exited:
        status = exited.code
    out, err = capsys.readouterr()
    return status, out, err


# -- config file errors: the exact line, exit 2 -----------------------------------

CONFIG_ERRORS = [
    ("bad-seconds",
     GOOD_RULE + '[[rule]]\nname = "web"\nlisten = "127.0.0.1:8081"\nconnect = "h:80"\nidle_timeout = "soon"\n',
     'fwd.toml: rule 2 ("web"): idle_timeout: expected a number of seconds >= 0, got "soon"'),
    ("negative-seconds", GOOD_RULE + "half_closed_timeout = -1\n",
     "fwd.toml: rule 1: half_closed_timeout: expected a number of seconds >= 0, got -1"),
    ("zero-connect-timeout", GOOD_RULE + "connect_timeout = 0\n",
     "fwd.toml: rule 1: connect_timeout: expected a positive number of seconds, got 0"),
    ("unknown-key", GOOD_RULE + 'listn = "x"\n',
     f'fwd.toml: rule 1: listn: unknown key (known: {KNOWN})'),
    ("unknown-table", '[server]\nport = 1\n' + GOOD_RULE,
     "fwd.toml: [server]: unknown table or key (expected [defaults] and [[rule]] tables)"),
    ("unknown-top-level-key", 'port = 1\n' + GOOD_RULE,
     "fwd.toml: [port]: unknown table or key (expected [defaults] and [[rule]] tables)"),
    ("rule-as-table", '[rule]\nlisten = "127.0.0.1:1"\n',
     'fwd.toml: rule: expected [[rule]] tables, got {"listen": "127.0.0.1:1"}'),
    ("duplicate-name", '[[rule]]\nname = "web"\nlisten = "127.0.0.1:1"\nconnect = "h:80"\n'
                       '[[rule]]\nname = "web"\nlisten = "127.0.0.1:2"\nconnect = "h:80"\n',
     'fwd.toml: rule 2 ("web"): name: "web" is already the name of rule 1 ("web")'),
    ("duplicate-listen", GOOD_RULE + GOOD_RULE,
     'fwd.toml: rule 2: listen: "127.0.0.1:8080" is already where rule 1 listens'),
    ("port-0-twice-without-names", '[[rule]]\nlisten = "127.0.0.1:0"\nconnect = "h:1"\n' * 2,
     'fwd.toml: rule 2: name: missing, and "127.0.0.1:0" is already where rule 1 listens: give each rule on '
     'port 0 a name'),
    ("missing-connect", '[[rule]]\nname = "db"\nlisten = "127.0.0.1:1"\n',
     'fwd.toml: rule 1 ("db"): connect: missing (expected "host:port")'),
    ("missing-listen", '[[rule]]\nconnect = "h:1"\n',
     'fwd.toml: rule 1: listen: missing (expected "host:port")'),
    ("listen-without-port", '[[rule]]\nlisten = "127.0.0.1"\nconnect = "h:1"\n',
     'fwd.toml: rule 1: listen: expected "host:port", like "127.0.0.1:8080", got "127.0.0.1"'),
    ("ipv6-without-brackets", '[[rule]]\nlisten = "::1:8080"\nconnect = "h:1"\n',
     'fwd.toml: rule 1: listen: expected "host:port" with an IPv6 address in brackets, like "[::1]:8080", '
     'got "::1:8080"'),
    ("connect-port-0", '[[rule]]\nlisten = "127.0.0.1:1"\nconnect = "h:0"\n',
     'fwd.toml: rule 1: connect: expected "host:port" with a port from 1 to 65535, got "h:0"'),
    ("listen-not-a-string", '[[rule]]\nlisten = 8080\nconnect = "h:1"\n',
     'fwd.toml: rule 1: listen: expected "host:port", got 8080'),
    ("bad-allow", GOOD_RULE + 'allow = ["10.0.0.0/8", "10.0.0.300"]\n',
     'fwd.toml: rule 1: allow: expected an address or a network, like 10.0.0.0/8, 192.0.2.7 or ::1, '
     'got "10.0.0.300"'),
    ("allow-not-a-list", GOOD_RULE + 'allow = 10\n',
     "fwd.toml: rule 1: allow: expected a list of addresses or networks, got 10"),
    ("bad-accept-proxy", GOOD_RULE + 'accept_proxy = ["10.0.0.0/33"]\n',
     'fwd.toml: rule 1: accept_proxy: expected an address or a network, like 10.0.0.0/8, 192.0.2.7 or ::1, '
     'got "10.0.0.0/33"'),
    ("accept-proxy-not-a-list", GOOD_RULE + 'accept_proxy = true\n',
     "fwd.toml: rule 1: accept_proxy: expected a list of addresses or networks, got true"),
    ("defaults-bad-accept-proxy", '[defaults]\naccept_proxy = ["balancer"]\n' + GOOD_RULE,
     'fwd.toml: [defaults]: accept_proxy: expected an address or a network, like 10.0.0.0/8, 192.0.2.7 or ::1, '
     'got "balancer"'),
    ("bool-limit", GOOD_RULE + "max_per_client = true\n",
     "fwd.toml: rule 1: max_per_client: expected an integer >= 0 (0 = no limit), got true"),
    ("negative-limit", GOOD_RULE + "max_connections = -1\n",
     "fwd.toml: rule 1: max_connections: expected an integer >= 0 (0 = no limit), got -1"),
    ("big-backlog", GOOD_RULE + "backlog = 70000\n",
     "fwd.toml: rule 1: backlog: expected an integer from 0 to 65535, got 70000"),
    ("bad-size", GOOD_RULE + 'high_water = "1T"\n',
     'fwd.toml: rule 1: high_water: expected a positive number of bytes, like 65536, 512K, 1M or 1G, got "1T"'),
    ("bad-name", GOOD_RULE + 'name = "my web"\n',
     'fwd.toml: rule 1 ("my web"): name: expected a name of letters, digits, \'_\', \'.\' and \'-\', '
     'got "my web"'),
    ("defaults-bad-value", '[defaults]\nmax_connections = "many"\n' + GOOD_RULE,
     'fwd.toml: [defaults]: max_connections: expected an integer >= 0 (0 = no limit), got "many"'),
    ("defaults-own-key", '[defaults]\nlisten = "127.0.0.1:1"\n' + GOOD_RULE,
     'fwd.toml: [defaults]: listen: not allowed in [defaults] (each rule has its own), got "127.0.0.1:1"'),
    ("defaults-unknown-key", '[defaults]\ntimeout = 1\n' + GOOD_RULE,
     f"fwd.toml: [defaults]: timeout: unknown key (known: {KNOWN})"),
    ("no-rules", '[defaults]\nbacklog = 1\n', "fwd.toml: no [[rule]] table: nothing to forward"),
    # str.isdigit() takes these, and int() refuses the first (it was a traceback) and reads the second as 12.
    ("superscript-size", GOOD_RULE + 'high_water = "1\u00b2"\n',
     'fwd.toml: rule 1: high_water: expected a positive number of bytes, like 65536, 512K, 1M or 1G, got "1\u00b2"'),
    ("arabic-indic-backlog", GOOD_RULE + 'backlog = "\u0661\u0662"\n',
     'fwd.toml: rule 1: backlog: expected an integer from 0 to 65535, got "\u0661\u0662"'),
    ("arabic-indic-seconds", GOOD_RULE + 'idle_timeout = "\u0661\u0662"\n',
     'fwd.toml: rule 1: idle_timeout: expected a number of seconds >= 0, got "\u0661\u0662"'),
    ("underscored-seconds", GOOD_RULE + 'connect_timeout = "1_0"\n',
     'fwd.toml: rule 1: connect_timeout: expected a positive number of seconds, got "1_0"'),
    ("superscript-port", '[[rule]]\nlisten = "127.0.0.1:8\u00b2"\nconnect = "127.0.0.1:80"\n',
     'fwd.toml: rule 1: listen: expected "host:port" with a port from 0 to 65535, got "127.0.0.1:8\u00b2"'),
    # Values that made Python raise (float() overflows, int() refuses 4300 digits, the parser recurses):
    # the same line as any other bad value, cut short.
    ("400-digit-seconds", GOOD_RULE + "idle_timeout = " + "9" * 400 + "\n",
     "fwd.toml: rule 1: idle_timeout: expected a number of seconds >= 0, got " + "9" * 40 + "... (400 characters)"),
    ("400-digit-connect-timeout", GOOD_RULE + "connect_timeout = " + "9" * 400 + "\n",
     "fwd.toml: rule 1: connect_timeout: expected a positive number of seconds, got " + "9" * 40
     + "... (400 characters)"),
    ("400-digit-limit", GOOD_RULE + "max_connections = " + "9" * 400 + "\n",
     "fwd.toml: rule 1: max_connections: expected an integer >= 0 (0 = no limit), got " + "9" * 40
     + "... (400 characters)"),
    ("5000-digit-size-string", GOOD_RULE + 'high_water = "' + "9" * 5000 + '"\n',
     'fwd.toml: rule 1: high_water: expected a positive number of bytes, like 65536, 512K, 1M or 1G, got "'
     + "9" * 39 + '..." (5000 characters)'),
    ("size-past-8-exbibytes", GOOD_RULE + 'high_water = "8589934592G"\n',
     'fwd.toml: rule 1: high_water: expected a positive number of bytes, like 65536, 512K, 1M or 1G, '
     'got "8589934592G"'),
    ("5000-digit-literal", GOOD_RULE + "max_connections = " + "9" * 5000 + "\n",
     "fwd.toml: an integer of more than 4300 digits cannot be read"),
    ("nested-arrays", GOOD_RULE + "allow = " + "[" * 50000 + "]" * 50000 + "\n",
     "fwd.toml: arrays or tables nested too deeply to read"),
    ("nested-inline-tables", GOOD_RULE + "x = " + "{a=" * 5000 + "1" + "}" * 5000 + "\n",
     "fwd.toml: arrays or tables nested too deeply to read"),
    # Several targets, their balance and health.
    ("empty-connect-list", '[[rule]]\nlisten = "127.0.0.1:8080"\nconnect = []\n',
     'fwd.toml: rule 1: connect: expected "host:port" or a list of at least one, got []'),
    ("bad-connect-entry", '[[rule]]\nlisten = "127.0.0.1:8080"\nconnect = ["127.0.0.1:80", "b"]\n',
     'fwd.toml: rule 1: connect: expected "host:port", like "127.0.0.1:8080", got "b"'),
    ("connect-not-a-list", '[[rule]]\nlisten = "127.0.0.1:8080"\nconnect = 80\n',
     'fwd.toml: rule 1: connect: expected a list of "host:port", got 80'),
    ("connect-twice", '[[rule]]\nlisten = "127.0.0.1:8080"\nconnect = ["h:80", "g:80", "h:80"]\n',
     'fwd.toml: rule 1: connect: "h:80" is listed twice (each target once)'),
    ("connect-twice-spelt-otherwise", '[[rule]]\nlisten = "127.0.0.1:8080"\nconnect = ["[::1]:80", "[0::1]:80"]\n',
     'fwd.toml: rule 1: connect: "[0::1]:80" is listed twice (each target once)'),
    ("unknown-balance", GOOD_RULE + 'balance = "random"\n',
     'fwd.toml: rule 1: balance: expected "first", "roundrobin" or "leastconn", got "random"'),
    ("negative-max-fails", GOOD_RULE + "max_fails = -1\n",
     "fwd.toml: rule 1: max_fails: expected an integer >= 0, got -1"),
    ("zero-fail-timeout", '[defaults]\nfail_timeout = 0\n' + GOOD_RULE,
     "fwd.toml: [defaults]: fail_timeout: expected a positive number of seconds, got 0"),
    ("bad-health-check-interval", GOOD_RULE + 'health_check_interval = "often"\n',
     'fwd.toml: rule 1: health_check_interval: expected a number of seconds >= 0, got "often"'),
    ("bad-proto", GOOD_RULE + 'proto = "sctp"\n', 'fwd.toml: rule 1: proto: expected "tcp" or "udp", got "sctp"'),
    ("udp-with-send-proxy", GOOD_RULE + 'proto = "udp"\nsend_proxy = "v2"\n',
     "fwd.toml: rule 1: send_proxy: not for a UDP rule (proto=udp): a UDP rule sends no PROXY header"),
    ("udp-with-defaults-keepalive", '[defaults]\ntcp_keepalive = 60\n' + GOOD_RULE + 'proto = "udp"\n',
     "fwd.toml: rule 1: tcp_keepalive: not for a UDP rule (proto=udp): a UDP socket has no keepalive"),
]


@pytest.mark.parametrize("text, line", [case[1:] for case in CONFIG_ERRORS], ids=[case[0] for case in CONFIG_ERRORS])
@pytest.mark.parametrize("check", [False, True], ids=["run", "check-config"])
def test_config_error_is_one_line_naming_file_rule_key_and_value_and_exits_2(
        text: str, line: str, check: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """Each bad config: exactly one stderr line, exit 2, with or without --check-config."""
    write(text)
    status, out, err = run(["-c", "fwd.toml"] + (["--check-config"] if check else []), capsys)
    assert (status, out, err) == (2, "", f"{PROG}: error: {line}\n")


@pytest.mark.parametrize("text, line", [
    ('[[rule]]\nlisten = "127.0.0.1:1"\nconnect "h:1"\n', 3),
    (GOOD_RULE + '[[rule]]\nname = "unterminated\n', 5),
    ('[[rule]]\nlisten = "127.0.0.1:1"\nlisten = "127.0.0.1:2"\n', 3),
], ids=["missing-equals", "unterminated-string", "duplicate-key"])
def test_toml_syntax_error_names_file_and_line(text: str, line: int, capsys: pytest.CaptureFixture[str]) -> None:
    """A TOML syntax error: ``file:line: what``, one line, exit 2."""
    write(text)
    status, out, err = run(["-c", "fwd.toml", "--check-config"], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"{PROG}: error: fwd.toml:{line}: ") and err.count("\n") == 1, err


def test_missing_config_file_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A config file that does not exist: one line naming it, exit 2."""
    status, out, err = run(["-c", "nowhere.toml"], capsys)
    assert (status, err) == (2, f"{PROG}: error: nowhere.toml: cannot read it: No such file or directory\n")


# -- flag errors: the exact line, exit 2 ----------------------------------------------

FLAG_ERRORS = [
    (["-L", "8080:h"], '-L "8080:h": expected [BIND:]PORT:HOST:HOSTPORT[,key=value...] with IPv6 addresses '
                       'in brackets, got "8080:h"'),
    (["-L", "::1:8080:h:80"], '-L "::1:8080:h:80": expected [BIND:]PORT:HOST:HOSTPORT[,key=value...] with IPv6 '
                              'addresses in brackets, got "::1:8080:h:80"'),
    (["-L", "8080:h:80,idle_timeout=soon"],
     '-L "8080:h:80,idle_timeout=soon": idle_timeout: expected a number of seconds >= 0, got "soon"'),
    (["-L", "8080:h:80,idle_timeout=nan"],
     '-L "8080:h:80,idle_timeout=nan": idle_timeout: expected a number of seconds >= 0, got "nan"'),
    (["-L", "8080:h:80,colour=red"], f'-L "8080:h:80,colour=red": colour: unknown key (known: {KNOWN})'),
    (["-L", "8080:h:80,allow"], '-L "8080:h:80,allow": expected key=value after the address, got "allow"'),
    (["-L", "8080:h:80,name=a,name=b"], '-L "8080:h:80,name=a,name=b": name: given twice, got "b"'),
    (["-L", "8080:h:80,listen=127.0.0.1:1"],
     '-L "8080:h:80,listen=127.0.0.1:1": listen: given by [BIND:]PORT:HOST:HOSTPORT, not as an option'),
    (["-L", "8080:h:80,connect=g"], '-L "8080:h:80,connect=g": connect: expected "host:port", like '
                                    '"127.0.0.1:8080", got "g"'),
    (["-L", "8080:h:80,connect=H:80"],
     '-L "8080:h:80,connect=H:80": connect: "H:80" is listed twice (each target once)'),
    (["-L", "8080:h:80,balance=rr"],
     '-L "8080:h:80,balance=rr": balance: expected "first", "roundrobin" or "leastconn", got "rr"'),
    (["-L", "8080:h:80,max_fails=x"], '-L "8080:h:80,max_fails=x": max_fails: expected an integer >= 0, got "x"'),
    (["-L", "http:h:80"], '-L "http:h:80": listen: expected "host:port" with a port from 0 to 65535, '
                          'got "127.0.0.1:http"'),
    (["-L", "8080:h:80,allow=bad"], '-L "8080:h:80,allow=bad": allow: expected an address or a network, '
                                    'like 10.0.0.0/8, 192.0.2.7 or ::1, got "bad"'),
    (["-L", "8080:h:80,accept_proxy=10.0.0.1/8,accept_proxy=10.0.0.0/99"],
     '-L "8080:h:80,accept_proxy=10.0.0.1/8,accept_proxy=10.0.0.0/99": accept_proxy: expected an address or a '
     'network, like 10.0.0.0/8, 192.0.2.7 or ::1, got "10.0.0.0/99"'),
    (["-L", "8080:h:80,high_water=1T"], '-L "8080:h:80,high_water=1T": high_water: expected a positive number '
                                        'of bytes, like 65536, 512K, 1M or 1G, got "1T"'),
    (["-L", "8080:h:80,max_connections=" + "9" * 5000],
     '-L "8080:h:80,max_connections=' + "9" * 13 + '..." (5026 characters): max_connections: expected an '
     'integer >= 0 (0 = no limit), got "' + "9" * 39 + '..." (5000 characters)'),
    (["-L", "8080:h:" + "9" * 5000], '-L "8080:h:' + "9" * 32 + '..." (5007 characters): connect: expected '
                                     '"host:port" with a port from 1 to 65535, got "h:' + "9" * 37
                                     + '..." (5002 characters)'),
    (["-L", "8080:h:80", "-L", "8080:g:81"],
     '-L "8080:g:81": listen: "127.0.0.1:8080" is already where -L "8080:h:80" listens'),
    (["-L", "1:h:80,name=a", "-L", "2:h:80,name=a"],
     '-L "2:h:80,name=a": name: "a" is already the name of -L "1:h:80,name=a"'),
    (["-l", "0.0.0.0", "-L", "8080:h:80"],
     "-l cannot be combined with -L or -c: give every rule with -L or in the config file"),
    (["-p", "1", "-r", "h", "-P", "2", "-c", "fwd.toml"],
     "-p/-r/-P cannot be combined with -L or -c: give every rule with -L or in the config file"),
    (["-l", "2024", "-r", "h", "-P", "80", "-p", "1"], "-l takes an address; did you mean -p 2024?"),
    (["-r", "80", "-P", "80", "-p", "1"], "-r takes a host; did you mean -P 80?"),
    ([], "the following arguments are required: -p/--local-port, -r/--remote-ip, -P/--remote-port "
         "(or give rules with -L or -c)"),
    (["-L", "1:h:2", "--high-water", "1T"], "argument --high-water: invalid size '1T': expected a positive "
                                            "number of bytes, like 65536, 512K, 1M or 1G"),
    # int() and float() also take these: the flags, like the config file, take plain ASCII numbers.
    (["-L", "1:h:2", "--connect-timeout", "1_0"], "argument --connect-timeout: invalid time '1_0': expected a "
                                                  "positive number of seconds"),
    (["-L", "1:h:2", "--workers", "\u0662"], "argument --workers: invalid worker count '\u0662': expected an "
                                             "integer from 1 to 256"),
    (["-L", "1:h:2", "--backlog", " 2"], "argument --backlog: invalid backlog ' 2': expected an integer "
                                         "from 0 to 65535"),
    (["-L", "1:h:2", "--drain-timeout", "-1"], "argument --drain-timeout: invalid time '-1': expected a number "
                                               "of seconds >= 0"),
    (["-L", "1:h:2", "--metrics", "a:b"], "argument --metrics: invalid address 'a:b': expected [HOST:]PORT, "
                                          "like 9100 or 127.0.0.1:9100 ([::1]:9100 for IPv6)"),
    (["-L", "1:h:2", "--log-format", "xml"], "argument --log-format: invalid choice: 'xml' (choose from 'text', "
                                             "'json')"),
    (["-L", "8080:h:80,proto=udp,half_closed_timeout=5"], '-L "8080:h:80,proto=udp,half_closed_timeout=5": '
     "half_closed_timeout: not for a UDP rule (proto=udp): a UDP session has no half-close"),
    (["-L", "8080:h:80,proto=udp", "--splice"], '-L "8080:h:80,proto=udp": splice (--splice): not for a UDP rule '
                                                "(proto=udp): datagrams are relayed whole, not spliced"),
    (["-L", "53:h:53,proto=udp", "-L", "53:g:53,proto=udp"],
     '-L "53:g:53,proto=udp": listen: "127.0.0.1:53" is already where -L "53:h:53,proto=udp" listens'),
]


@pytest.mark.parametrize("argv, line", FLAG_ERRORS,
                         ids=[shorten(" ".join(case[0])) or "nothing" for case in FLAG_ERRORS])
def test_bad_flag_is_one_usage_line_and_exits_2(argv: List[str], line: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Each bad flag value: exactly one stderr line naming it, exit 2, nothing started.

    Rules that collide are a config error (they may come from the file), so
    their line does not point at --help.
    """
    write(GOOD_RULE)
    status, out, err = run(argv + ["--check-config"], capsys)
    suffix = "" if "is already" in line else " (see --help)"
    assert (status, out, err) == (2, "", f"{PROG}: error: {line}{suffix}\n")


def test_errors_never_show_resolver_error_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    """An unresolvable name says what failed, without ``[Errno -2]``."""
    status, out, err = run(["-p", "0", "-r", "no-such-host.invalid", "-P", "80", "--workers", "2"], capsys)
    assert status == 1
    assert "no-such-host.invalid" in err and "[Errno" not in err
    status, out, err = run(["-l", "no-such-host.invalid", "-p", "0", "-r", "127.0.0.1", "-P", "80",
                            "--workers", "2"], capsys)
    assert status == 1
    assert "no-such-host.invalid" in err and "[Errno" not in err


# -- -L parsing ------------------------------------------------------------------------


@pytest.mark.parametrize("spec, listen, remote", [
    ("8080:example.org:80", ("127.0.0.1", 8080), ("example.org", 80)),
    ("0.0.0.0:8080:10.0.0.5:80", ("0.0.0.0", 8080), ("10.0.0.5", 80)),
    ("[::1]:8080:[2001:db8::1]:80", ("::1", 8080), ("2001:db8::1", 80)),
    ("8080:[2001:db8::1]:80", ("127.0.0.1", 8080), ("2001:db8::1", 80)),
    ("[::]:0:host.example:65535", ("::", 0), ("host.example", 65535)),
    ("localhost:8080:h:1", ("localhost", 8080), ("h", 1)),
], ids=["default-bind", "ipv4-bind", "ipv6-both", "ipv6-host", "ipv6-any-port-0", "name-bind"])
def test_forward_spec_reads_ssh_syntax_with_ipv6_in_brackets(spec: str, listen: tuple, remote: tuple) -> None:
    """[BIND:]PORT:HOST:HOSTPORT, BIND 127.0.0.1 by default, brackets around IPv6 addresses."""
    rule = parse_forward_spec(spec)
    assert (rule.local_host, rule.local_port) == listen
    assert (rule.remote_host, rule.remote_port) == remote


def test_forward_spec_options_set_every_key_and_repeat_list_keys() -> None:
    """Options after commas: every config key; allow/deny repeated once per entry."""
    rule = parse_forward_spec("8080:h:80,name=web,allow=10.0.0.0/8,allow=::1,deny=10.9.0.0/16,max_connections=5,"
                              "max_per_client=2,connect_timeout=1.5,idle_timeout=60,half_closed_timeout=5,"
                              "backlog=128,high_water=1M,accept_proxy=10.1.0.0/16,accept_proxy=fd00::/8")
    assert rule.name == "web"
    assert rule.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))
    assert rule.deny == (ipaddress.ip_network("10.9.0.0/16"),)
    assert (rule.max_connections, rule.max_per_client, rule.backlog, rule.high_water) == (5, 2, 128, 1 << 20)
    assert (rule.connect_timeout, rule.idle_timeout, rule.half_closed_timeout) == (1.5, 60.0, 5.0)
    assert rule.accept_proxy == (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8"))


def test_forward_spec_error_is_a_config_error() -> None:
    """parse_forward_spec raises ConfigError (a ValueError) for a bad spec."""
    with pytest.raises(ConfigError):
        parse_forward_spec("8080")
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("text, size", [("65536", 65536), ("512K", 512 << 10), ("2m", 2 << 20), ("1G", 1 << 30),
                                        (4096, 4096)])
def test_sizes_accept_k_m_and_g_suffixes(text: object, size: int) -> None:
    """Sizes are bytes, or K, M, G (binary multiples), upper or lower case."""
    assert parse_size(text) == size


# -- precedence -------------------------------------------------------------------------


def test_rule_keys_override_defaults_which_override_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """Built-in < command-line flags < [defaults] < the rule's own keys."""
    write('[defaults]\nconnect_timeout = 3\nidle_timeout = 30\n'
          '[[rule]]\nname = "a"\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:1"\nidle_timeout = 60\n')
    status, out, err = run(["-c", "fwd.toml", "--connect-timeout", "7", "--backlog", "99", "--check-config"],
                           capsys)
    assert (status, err) == (0, "")
    assert " connect_timeout=3 idle_timeout=60 " in out
    assert " backlog=99 " in out


def test_rule_allow_replaces_the_defaults_allow() -> None:
    """A rule's own allow list replaces [defaults]' (it is not added to it); deny the same."""
    path = write('[defaults]\nallow = ["10.0.0.0/8"]\ndeny = ["10.1.0.0/16"]\n'
                 '[[rule]]\nlisten = "127.0.0.1:1"\nconnect = "h:1"\nallow = ["192.0.2.0/24"]\n'
                 '[[rule]]\nlisten = "127.0.0.1:2"\nconnect = "h:1"\ndeny = []\n')
    first, second = load_config(path)
    assert first.allow == (ipaddress.ip_network("192.0.2.0/24"),)
    assert first.deny == (ipaddress.ip_network("10.1.0.0/16"),)
    assert second.allow == (ipaddress.ip_network("10.0.0.0/8"),)
    assert second.deny == ()


def test_rule_accept_proxy_replaces_the_defaults_accept_proxy() -> None:
    """accept_proxy is a list key like allow: in [defaults] too, and a rule's own list (even empty) replaces it."""
    path = write('[defaults]\naccept_proxy = ["10.0.0.0/8", "::1"]\n'
                 '[[rule]]\nlisten = "127.0.0.1:1"\nconnect = "h:1"\n'
                 '[[rule]]\nlisten = "127.0.0.1:2"\nconnect = "h:1"\naccept_proxy = "192.0.2.7"\n'
                 '[[rule]]\nlisten = "127.0.0.1:3"\nconnect = "h:1"\naccept_proxy = []\n')
    first, second, third = load_config(path)
    assert first.accept_proxy == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))
    assert second.accept_proxy == (ipaddress.ip_network("192.0.2.7/32"),)
    assert third.accept_proxy == ()


def test_port_0_may_repeat_with_names() -> None:
    """Two named rules on port 0 of one address do not collide: each gets its own free port."""
    path = write('[[rule]]\nname = "a"\nlisten = "127.0.0.1:0"\nconnect = "h:1"\n'
                 '[[rule]]\nname = "b"\nlisten = "127.0.0.1:0"\nconnect = "h:2"\n')
    assert len(load_config(path)) == 2


# -- --check-config ---------------------------------------------------------------------


@needs_ipv6
def test_check_config_prints_every_key_of_every_rule_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """One line per rule (config rules after -L rules), every key, defaults applied; nothing on stderr."""
    write('[defaults]\nmax_per_client = 4\nallow = ["10.0.0.0/8", "::1"]\n'
          '[[rule]]\nname = "web"\nlisten = "0.0.0.0:0"\nconnect = "localhost:80"\nidle_timeout = 300\n'
          '[[rule]]\nlisten = "[::1]:0"\nconnect = "[2001:db8::5]:5432"\nallow = []\nhigh_water = "2M"\n')
    status, out, err = run(["-c", "fwd.toml", "-L", "0:127.0.0.1:90,deny=192.0.2.1", "--check-config"], capsys)
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "name=127.0.0.1:0 listen=127.0.0.1:0 connect=127.0.0.1:90 allow=all deny=192.0.2.1/32 max_connections=0 "
        "max_per_client=0 connect_timeout=10 idle_timeout=0 half_closed_timeout=0 backlog=4096 "
        "high_water=1M send_proxy=none balance=first max_fails=1 fail_timeout=10 health_check_interval=0 "
        "accept_proxy=none proto=tcp source=none tcp_keepalive=0",
        "name=web listen=0.0.0.0:0 connect=localhost:80 allow=10.0.0.0/8,::1/128 deny=none max_connections=0 "
        "max_per_client=4 connect_timeout=10 idle_timeout=300 half_closed_timeout=0 backlog=4096 "
        "high_water=1M send_proxy=none balance=first max_fails=1 fail_timeout=10 health_check_interval=0 "
        "accept_proxy=none proto=tcp source=none tcp_keepalive=0",
        "name=[::1]:0 listen=[::1]:0 connect=[2001:db8::5]:5432 allow=all deny=none max_connections=0 "
        "max_per_client=4 connect_timeout=10 idle_timeout=0 half_closed_timeout=0 backlog=4096 "
        "high_water=2M send_proxy=none balance=first max_fails=1 fail_timeout=10 health_check_interval=0 "
        "accept_proxy=none proto=tcp source=none tcp_keepalive=0",
    ]


def test_check_config_shows_every_target_and_their_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """Several targets: connect=a,b,c in order (the -L address's first, then each connect= option; a config's list)."""
    write('[defaults]\nbalance = "leastconn"\nmax_fails = 0\n'
          '[[rule]]\nname = "db"\nlisten = "127.0.0.1:0"\nconnect = ["localhost:5432", "127.0.0.2:5433"]\n'
          'fail_timeout = 0.5\nhealth_check_interval = 2\n')
    status, out, err = run(["-L", "0:127.0.0.1:1,connect=127.0.0.1:2,connect=localhost:3,balance=roundrobin,name=l",
                            "-c", "fwd.toml", "--check-config"], capsys)
    assert (status, err) == (0, "")
    fields = [dict(field.split("=", 1) for field in line.split()) for line in out.splitlines()]
    assert [(f["connect"], f["balance"], f["max_fails"], f["fail_timeout"], f["health_check_interval"])
            for f in fields] == [("127.0.0.1:1,127.0.0.1:2,localhost:3", "roundrobin", "1", "10", "0"),
                                 ("localhost:5432,127.0.0.2:5433", "leastconn", "0", "0.5", "2")]


def test_connect_options_and_lists_make_the_rule_s_targets(tmp_path: Path) -> None:
    """The -L address is the first target, each connect= adds one; a config's list, its first then the rest."""
    rule = parse_forward_spec("0:a:1,connect=b:2,connect=[::1]:3")
    assert (rule.remote_host, rule.remote_port, rule.targets) == ("a", 1, (("b", 2), ("::1", 3)))
    assert rule.all_targets == (("a", 1), ("b", 2), ("::1", 3))
    config = tmp_path / "fwd.toml"
    config.write_text('[[rule]]\nlisten = "127.0.0.1:0"\nconnect = ["a:1", "b:2"]\n'
                      '[[rule]]\nlisten = "127.0.0.1:1"\nconnect = "c:3"\n')
    several, one = load_config(str(config))
    assert (several.all_targets, one.all_targets, one.targets) == ((("a", 1), ("b", 2)), (("c", 3),), ())


def test_check_config_shows_the_one_rule_form_too(capsys: pytest.CaptureFixture[str]) -> None:
    """The article's flags make one rule, printed the same way."""
    status, out, err = run(["-p", "0", "-r", "127.0.0.1", "-P", "80", "--high-water", "1G", "--check-config"],
                           capsys)
    assert (status, err) == (0, "")
    assert out == describe_rule(parse_forward_spec("0:127.0.0.1:80,high_water=1G")) + "\n"


@pytest.fixture
def port_in_use() -> Iterator[int]:
    """A loopback port another socket listens on."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield holder.getsockname()[1]


@pytest.mark.parametrize("argv, line", [
    (["-L", "0:no-such-host.invalid:80"], "cannot resolve remote host 'no-such-host.invalid': "),
    (["-L", "{port}:no-such-host.invalid:80"], "cannot resolve remote host 'no-such-host.invalid': "),
    (["-L", "192.0.2.1:0:127.0.0.1:80"], "cannot listen on 192.0.2.1:0: Cannot assign requested address"),
], ids=["unknown-host", "unknown-host-on-a-port-in-use", "not-a-local-address"])
def test_check_config_fails_where_start_fails_with_the_same_line(
        argv: List[str], line: str, port_in_use: int, capsys: pytest.CaptureFixture[str]) -> None:
    """--check-config resolves and binds what a start would: the same one line, exit 1, nothing on stdout."""
    argv = [arg.format(port=port_in_use) for arg in argv]
    checked = run(argv + ["--check-config"], capsys)
    assert checked[:2] == (1, "") and checked[2].startswith(f"{PROG}: {line.format(port=port_in_use)}"), checked
    assert checked[2].count("\n") == 1
    started = run(argv, capsys)  # (which may log its start lines first)
    assert started[:2] == (1, "") and started[2].split("\n")[-2].endswith(checked[2].split("\n")[-2]), started


@pytest.mark.parametrize("argv, line", [
    (["-L", "{port}:127.0.0.1:80"], "cannot listen on 127.0.0.1:{port}: Address already in use"),
    (["-L", "0:localhost:80", "--metrics", "{port}"], "cannot listen on 127.0.0.1:{port} for metrics: "),
], ids=["rule", "metrics"])
def test_check_config_notes_a_port_in_use_and_passes(
        argv: List[str], line: str, port_in_use: int, capsys: pytest.CaptureFixture[str]) -> None:
    """On the host of a running forwarder its ports are in use: the check before a reload notes it and passes."""
    argv = [arg.format(port=port_in_use) for arg in argv]
    status, out, err = run(argv + ["--check-config"], capsys)
    assert status == 0 and out.count("\n") == 1, (status, out, err)
    assert err.startswith(f"{PROG}: note: {line.format(port=port_in_use)}"), err
    assert err.endswith("(a start now would fail there)\n") and err.count("\n") == 1


def test_negative_zero_seconds_are_shown_as_0(capsys: pytest.CaptureFixture[str]) -> None:
    """-0.0 is 0: --check-config prints idle_timeout=0, not -0, from the file and from -L."""
    write('[[rule]]\nlisten = "127.0.0.1:0"\nconnect = "127.0.0.1:80"\nname = "f"\nidle_timeout = -0.0\n')
    status, out, err = run(["-c", "fwd.toml", "-L", "0:127.0.0.1:80,name=l,half_closed_timeout=-0.0",
                            "--check-config"], capsys)
    assert (status, err) == (0, "")
    assert [line.split()[8:10] for line in out.splitlines()] == [["idle_timeout=0", "half_closed_timeout=0"]] * 2


@pytest.mark.parametrize("argv, patched, line", [
    (["-c", "fwd.toml"], "load_config", "fwd.toml: cannot be read: unforeseen"),
    (["-L", "0:127.0.0.1:80"], "parse_forward_spec", '-L "0:127.0.0.1:80": cannot be read: unforeseen (see --help)'),
], ids=["config-file", "forward-flag"])
@pytest.mark.parametrize("check", [False, True], ids=["run", "check-config"])
def test_whatever_loading_the_rules_raises_is_a_config_error(argv: List[str], patched: str, line: str, check: bool,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only the errors the checks foresee: anything a parser raises is one error line and exit 2."""
    def parser(*args: object) -> None:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(cli_rules, patched, parser)  # where load_rules reads it
    write(GOOD_RULE)
    status, out, err = run(argv + (["--check-config"] if check else []), capsys)
    assert (status, out, err) == (2, "", f"{PROG}: error: {line}\n")
