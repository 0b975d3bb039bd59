"""Record the example traces the trace viewer plays: one per lesson, as JSON lines.

    python examples/lessons/record_traces.py            # all of them, into docs/assets/traces/
    python examples/lessons/record_traces.py 5 7        # only steps 05 and 07
    python examples/lessons/record_traces.py --into DIR 10

Each recording runs the step in this process, traced (``--trace-format
jsonl``'s renderer), on port 0, against a small server thread that plays
the scenario the step's page is about, and a client thread that sends a
request, half-closes and reads the reply:

- step 01: the client's EOF comes 0.1 s after its request, the server's
  answer after that: the article's recv() calls handle_close() at the EOF,
  so the reply is lost;
- step 05: the server thinks for 10 ms before it answers: the receiver sits
  at EOF, readable() stays True, and the loop spins (defect 9);
- step 07: the server sends 64 KiB and closes at once: POLLHUP comes with
  every read until the reply is through, and handle_close() lets it pass;
- step 10: its own poll() loop, written by hand, traced all the same.  A
  first client's pair is open and its socket readable when, in the same
  round, the listener closes that pair and accepts a second client onto the
  freed descriptor (the lower ones are taken, as tests/test_lessons.py
  does): the round's event for that number is stale, and serve() drops it.

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
    def after_eof(conn):  # step 01: the reply comes well after the client's EOF
        read_request(conn)
        time.sleep(0.3)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello\n")

    def slow(conn):  # step 05: thinks 10 ms; closes only once the reply is through
        read_request(conn)
        time.sleep(0.01)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello\n")
        time.sleep(0.01)

    def big_then_close(conn):  # step 07: a long reply, and the FIN right behind it
        read_request(conn)
        conn.sendall(b"x" * 65536)

    return {1: after_eof, 5: slow, 7: big_then_close}[step]


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


def client(port, done, pause):
    """Send the request, wait ``pause`` seconds, half-close, read the reply to the end."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(REQUEST)
            time.sleep(pause)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    except OSError:
        pass
    finally:
        done.set()


def record(step, path):
    """Run the step's scenario traced, writing the JSON lines to ``path``."""
    if step == 10:
        return record_stale_event(path)
    module = load_step(step)
    channels = module.asyncore.socket_map
    server = socket.create_server(("127.0.0.1", 0))
    server_thread = threading.Thread(target=serve_once, args=(server, server_for(step)), daemon=True)
    server_thread.start()
    done = threading.Event()
    # The meta line's argv: what `python -m asyncore_fwd.trace --format jsonl STEP ...` would show.
    saved_argv = sys.argv
    sys.argv = [f"examples/lessons/{STEPS[step]}", "-p", "0", "-r", "127.0.0.1", "-P", str(server.getsockname()[1])]
    with open(path, "w", encoding="utf-8") as output:
        trace.enable(output, format="jsonl")
        sys.argv = saved_argv
        try:
            listener = module.forwarder("127.0.0.1", 0, "127.0.0.1", server.getsockname()[1])
            port = listener.socket.getsockname()[1]
            # Step 01: the request is through to the server before the client's EOF comes.
            pause = 0.1 if step == 1 else 0.0
            threading.Thread(target=client, args=(port, done, pause), daemon=True).start()
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


def echo(listener, kept):
    """An echo server, for step 10: a thread per connection, until its EOF.  The
    sockets are kept open until the end, so that no descriptor number this
    process uses is freed behind the recording's back."""
    def serve_one(conn):
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)  # the EOF passed back; the descriptor stays
                    return
                conn.sendall(data)
        except OSError:
            pass

    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        kept.append(conn)
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def record_stale_event(path):
    """Step 10's scenario: a round whose event belongs to a socket closed within it."""
    module = load_step(10)
    channels = module.asyncore.socket_map
    server = socket.create_server(("127.0.0.1", 0))
    kept = []
    threading.Thread(target=echo, args=(server, kept), daemon=True).start()
    stale_pair = []
    accept = module.forwarder.handle_accept

    def handle_accept(self):
        # As if another handler had closed the first pair earlier in this round.
        while stale_pair:
            stale_pair.pop().close()
        accept(self)

    module.forwarder.handle_accept = handle_accept  # before tracing starts: traced like the rest

    def run_until(condition):
        deadline = time.monotonic() + WAIT
        while not condition() and time.monotonic() < deadline:
            module.serve(0.05, count=1)

    def answer(sock, size):
        sock.setblocking(False)
        received = b""

        def arrived():
            nonlocal received
            try:
                received += sock.recv(size - len(received))
            except BlockingIOError:
                pass
            return len(received) >= size
        run_until(arrived)
        return received

    saved_argv = sys.argv
    sys.argv = ["examples/lessons/step10_stale_events.py", "-p", "0", "-r", "127.0.0.1",
                "-P", str(server.getsockname()[1])]
    fillers = []
    with open(path, "w", encoding="utf-8") as output:
        trace.enable(output, format="jsonl")
        sys.argv = saved_argv
        try:
            listener = module.forwarder("127.0.0.1", 0, "127.0.0.1", server.getsockname()[1])
            address = listener.socket.getsockname()
            first = socket.create_connection(address, timeout=WAIT)
            first.sendall(b"ping")
            answer(first, 4)
            old = [obj for obj in channels.values() if not obj.accepting]
            second = socket.create_connection(address, timeout=WAIT)  # waits in the backlog
            first.sendall(b"stale")  # the first client's socket is readable in the next round
            time.sleep(0.05)
            top = max(obj.socket.fileno() for obj in old)
            while True:  # take the lower free numbers: the new pair gets the old one's
                fd = os.open(os.devnull, os.O_RDONLY)
                if fd > top:
                    os.close(fd)
                    break
                fillers.append(fd)
            stale_pair.extend(old)
            module.serve(0.05, count=1)  # accept closes the old pair; its event is stale
            second.sendall(b"ping")
            answer(second, 4)
            for sock in (first, second):
                sock.close()
            run_until(lambda: len(channels) <= 1)
            listener.close()
        finally:
            for fd in fillers:
                os.close(fd)
            trace.disable()
            module.forwarder.handle_accept = accept
            module.asyncore.close_all(ignore_all=True)
            server.close()
            for conn in kept:
                conn.close()


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
