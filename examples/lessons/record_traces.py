"""Record the example traces the trace viewer plays: one per lesson, as JSON lines.

    python examples/lessons/record_traces.py            # all of them, into docs/assets/traces/
    python examples/lessons/record_traces.py 5 7        # only steps 05 and 07
    python examples/lessons/record_traces.py --into DIR 10

Each recording runs the step in this process, traced (``--trace-format
jsonl``'s renderer), on port 0, against a small server thread that plays
the scenario the step's page is about, and a client thread that sends a
request, half-closes and reads the reply:

- step 01: the server answers after the client's EOF has arrived: the
  article's recv() calls handle_close() at that EOF, so the reply is lost;
- step 05: the server thinks for 10 ms before it answers: the receiver sits
  at EOF, readable() stays True, and the loop spins (defect 9);
- step 07: the server sends 64 KiB and closes at once: POLLHUP comes with
  every read until the reply is through, and handle_close() lets it pass;
- step 10: its own poll() loop, written by hand, traced all the same;
  a descriptor freed and reused in one round shows its stale event dropped.

Times differ from run to run; what a step does does not.  ``shape()`` is
what a test compares between the files kept here and a fresh recording.
"""

import argparse
import importlib.util
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from asyncore_fwd import trace  # noqa: E402  (after the path is set)

log = logging.getLogger("record_traces")

TRACES = ROOT / "docs" / "assets" / "traces"
STEPS = {1: "step01_bytes.py", 5: "step05_half_close_spins.py", 7: "step07_poll_hangup.py",
         10: "step10_stale_events.py"}
REQUEST = b"GET /hello.txt HTTP/1.0\r\n\r\n"
WAIT = 5.0


def load_step(step):
    """The step's script as a fresh module (its main block does not run)."""
    path = ROOT / "examples" / "lessons" / STEPS[step]
    spec = importlib.util.spec_from_file_location(f"recorded_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_request(conn):
    """Read up to the end of the request's headers (not to the client's EOF)."""
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def server_for(step):
    """The server's side of the step's scenario: a function of the accepted socket."""
    def after_eof(conn):  # step 01: the reply comes once the client's EOF is there
        read_request(conn)
        time.sleep(0.1)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello\n")

    def slow(conn):  # step 05: thinks 10 ms; closes only once the reply is through
        read_request(conn)
        time.sleep(0.01)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello\n")
        time.sleep(0.01)

    def big_then_close(conn):  # step 07: a long reply, and the FIN right behind it
        read_request(conn)
        conn.sendall(b"x" * 65536)

    def quick(conn):  # step 10
        read_request(conn)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello\n")
    return {1: after_eof, 5: slow, 7: big_then_close, 10: quick}[step]


def serve_once(listener, handler):
    """Accept one connection and play the server's part on it."""
    listener.settimeout(WAIT)
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    with conn:
        conn.settimeout(WAIT)
        try:
            handler(conn)
        except OSError:
            pass


def client(port, done):
    """Send the request, half-close, read the reply to the end."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(REQUEST)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    except OSError:
        pass
    finally:
        done.set()


def record(step, path):
    """Run the step's scenario traced, writing the JSON lines to ``path``."""
    module = load_step(step)
    channels = module.asyncore.socket_map
    server = socket.create_server(("127.0.0.1", 0))
    server_thread = threading.Thread(target=serve_once, args=(server, server_for(step)), daemon=True)
    server_thread.start()
    done = threading.Event()
    with open(path, "w", encoding="utf-8") as output:
        trace.enable(output, format="jsonl")
        try:
            listener = module.forwarder("127.0.0.1", 0, "127.0.0.1", server.getsockname()[1])
            port = listener.socket.getsockname()[1]
            threading.Thread(target=client, args=(port, done), daemon=True).start()
            deadline = time.monotonic() + WAIT
            # Until the client has its answer and every pair is closed: the listener is left.
            while (not done.is_set() or len(channels) > 1) and time.monotonic() < deadline:
                module.serve(0.05, count=1)
            listener.close()
        finally:
            trace.disable()
            module.asyncore.close_all(ignore_all=True)
            server.close()
    server_thread.join(WAIT)


def shape(lines):
    """What a recording shows, without its times and counts: the lanes, and each
    (kind, dispatcher, call, result) seen, with byte counts left out."""
    seen = set()
    for line in lines:
        event = json.loads(line)
        if event["kind"] in ("start", "end", "io"):
            result = event.get("result", "")
            if event["kind"] == "io" and result not in ("EOF", "reset"):
                result = result.split(" ")[0]  # "read 18B" -> "read"
            elif event["call"] not in ("readable", "writable"):
                result = ""
            seen.add((event["kind"], event["obj"], event["call"], result))
        elif event["kind"] in ("wait", "meta", "summary", "idle"):
            seen.add((event["kind"],))
    return seen


def main(argv=None):
    parser = argparse.ArgumentParser(description="Record the lessons' example traces for the trace viewer.")
    parser.add_argument("steps", nargs="*", type=int, metavar="STEP",
                        help="the steps to record (default: %s)" % ", ".join(map(str, sorted(STEPS))))
    parser.add_argument("--into", type=Path, default=TRACES, help="the folder to write stepNN.jsonl to")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        parser.error("no recording for step %s (there are: %s)" % (unknown[0], ", ".join(map(str, sorted(STEPS)))))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.makedirs(args.into, exist_ok=True)
    for step in args.steps or sorted(STEPS):
        path = args.into / f"step{step:02d}.jsonl"
        record(step, path)
        with open(path, encoding="utf-8") as recorded:
            count = sum(1 for _ in recorded)
        log.info("recorded %s: %d events", path, count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
