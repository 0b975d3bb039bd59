#!/usr/bin/env python3
# The floor relay of benchmarks/run.py (peer "floor"): an anchor, not part of asyncore_fwd.
#
# A copy of the project's own shared benchmark relay (min_epoll.py, written for these
# benchmarks, under this repository's MIT licence), kept byte for byte in what it does:
# only this header was added.  It is the least Python a TCP relay can run per event, so
# every workload is also shown as a ratio to it.  Not for use: no resets, timeouts or limits.
"""The least Python a TCP relay can run per event: one epoll loop, one dict lookup,
recv_into a preallocated buffer, send, and nothing else (no asyncore, no hooks, no stats).

A benchmark anchor, not a product: the floor of per-request cost for a Python forwarder
on a given machine. Run it as a peer beside asyncore_fwd in the same benchmark run.
Level-triggered epoll; a partial send parks the rest and stops reading that side until it
drains; EOF is passed on with shutdown(SHUT_WR). No resets, timeouts or limits: not for use.
Usage: min_epoll.py -l HOST -p PORT -r HOST -P PORT
"""
import argparse
import errno
import select
import signal
import socket
import sys

IN, OUT, ERR = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR | select.EPOLLHUP


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-l", default="127.0.0.1")
    ap.add_argument("-p", type=int, required=True)
    ap.add_argument("-r", required=True)
    ap.add_argument("-P", type=int, required=True)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((a.l, a.p))
    lsock.listen(1024)
    lsock.setblocking(False)
    ep = select.epoll()
    lfd = lsock.fileno()
    ep.register(lfd, IN)
    remote = (a.r, a.P)
    socks = {}     # fd -> socket
    peer = {}      # fd -> peer fd
    pending = {}   # fd -> bytes waiting to be written to fd
    eof = set()    # fds whose reading side ended
    buf = bytearray(262144)
    view = memoryview(buf)

    def close_pair(fd):
        p = peer.pop(fd, None)
        for f in (fd, p):
            if f is None or f not in socks:
                continue
            try:
                ep.unregister(f)
            except OSError:
                pass
            socks.pop(f).close()
            pending.pop(f, None)
            eof.discard(f)
            peer.pop(f, None)

    while True:
        for fd, ev in ep.poll():
            if fd == lfd:
                while True:
                    try:
                        c, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    s = socket.socket()
                    s.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    err = s.connect_ex(remote)
                    if err not in (0, errno.EINPROGRESS):
                        c.close(); s.close(); continue
                    cf, sf = c.fileno(), s.fileno()
                    socks[cf], socks[sf] = c, s
                    peer[cf], peer[sf] = sf, cf
                    pending[cf] = b""
                    pending[sf] = b""
                    ep.register(cf, 0)          # read the client once the server is up
                    ep.register(sf, OUT)
                    pending[sf] = None          # connecting marker
                continue
            sock = socks.get(fd)
            if sock is None:
                continue
            if pending.get(fd) is None:        # connect finished
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    close_pair(fd); continue
                pending[fd] = b""
                ep.modify(fd, IN)
                ep.modify(peer[fd], IN)
                continue
            p = peer[fd]
            if ev & OUT:
                data = pending[fd]
                try:
                    n = sock.send(data)
                except OSError:
                    close_pair(fd); continue
                data = data[n:]
                pending[fd] = data
                if not data:
                    if p in eof:
                        sock.shutdown(socket.SHUT_WR)
                        if fd in eof:
                            close_pair(fd); continue
                        ep.modify(fd, 0 if fd in eof else IN)
                    else:
                        ep.modify(fd, 0 if fd in eof else IN)
                        ep.modify(p, IN)
                continue
            if ev & (IN | ERR):
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    continue
                except OSError:
                    close_pair(fd); continue
                ps = socks[p]
                if n == 0:
                    eof.add(fd)
                    if not pending[p]:
                        try:
                            ps.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        if p in eof:
                            close_pair(fd); continue
                    ep.modify(fd, 0)
                    continue
                try:
                    m = ps.send(view[:n])
                except BlockingIOError:
                    m = 0
                except OSError:
                    close_pair(fd); continue
                if m < n:
                    pending[p] = bytes(view[m:n])
                    ep.modify(p, OUT)
                    ep.modify(fd, 0)


if __name__ == "__main__":
    main()
