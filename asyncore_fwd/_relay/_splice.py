"""Zero-copy relaying on Linux: ``os.splice()`` through a kernel pipe per direction.

The copy relay reads each chunk into Python and writes it out again.  With
splice() the bytes go from one socket into a pipe, and from the pipe into the
other socket, without ever entering user space.  The pipe plays the part of
a side's ``outgoing`` buffer: ``len()`` of it is what waits in the pipe, so
backpressure, half-close and the close logic of ``_Pipe`` work unchanged.
The price: a pipe costs two descriptors per direction, so a connection uses
six instead of two.  The pipes are made when the client is accepted, before
anything is relayed: running out of descriptors then refuses that client and
pauses accepting, as for its socket, and never cuts a connection that is
already relaying.
"""

from __future__ import annotations

import os
from typing import Any, Tuple, Type, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from .._net import SPLICE_AVAILABLE as AVAILABLE
from ._connection import Connection
from ._copy import Receiver, _Pipe
from ._sender import Sender

__all__ = ["AVAILABLE", "KernelPipe", "SpliceReceiver", "SpliceSender", "splice_sides"]

S = TypeVar("S", bound=_Pipe)

_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


#: The largest pipe asked of the kernel (its own limit is 2 GiB, and less unless privileged).
MAX_PIPE_SIZE = 1 << 30


class KernelPipe:
    """A kernel pipe holding the bytes on their way to one socket; ``len()`` is how many."""

    __slots__ = ("read_fd", "write_fd", "queued", "capacity", "size", "blocked")

    def __init__(self, capacity: int) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.queued = 0
        #: What may wait in the pipe: the high-water mark, or less if the kernel
        #: would not grow the pipe that far.
        try:
            # fcntl() passes a C int: a mark of 4 GiB and more would wrap round to a page.
            size = fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, min(capacity, MAX_PIPE_SIZE))
        except OSError:  # over the system's limit: keep the pipe as it is
            size = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)
        self.capacity = min(capacity, size)
        #: What the kernel's pipe holds (a page at least): ``push`` may fill it past ``capacity``.
        self.size = size
        #: Set when the pipe took nothing more though it holds less than its
        #: capacity (the kernel counts pipe slots, not bytes: many small
        #: segments fill it early); cleared as soon as it drains a little.
        self.blocked = False

    def __len__(self) -> int:
        return self.queued

    def fill_from(self, fd: int) -> int:
        """Move what the socket ``fd`` has (up to the free room) into the pipe; 0 at EOF."""
        moved = os.splice(fd, self.write_fd, self.capacity - self.queued, flags=_FLAGS)
        self.queued += moved
        return moved

    def drain_to(self, fd: int) -> int:
        """Move what the socket ``fd`` can take out of the pipe."""
        moved = os.splice(self.read_fd, fd, self.queued, flags=_FLAGS)
        self.queued -= moved
        if moved:
            self.blocked = False
        return moved

    def push(self, data: bytes) -> None:
        """Write a few bytes into the pipe now, past ``capacity`` if need be (nothing more is
        read into it until it drains below); ValueError if the kernel's pipe cannot hold them."""
        if self.queued + len(data) > self.size:
            raise ValueError(f"{len(data)} bytes do not fit in a pipe of {self.size} holding {self.queued}")
        view = memoryview(data)
        while view:  # (a pipe with room takes all at once; should it take less, write the rest)
            written = os.write(self.write_fd, view)
            self.queued += written
            view = view[written:]

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self.write_fd = -1
        self.queued = 0


class _Splicing(_Pipe):
    """A side that relays with splice(): only reading and writing differ."""

    outgoing: Any  # a KernelPipe
    peer: _Splicing

    def __init__(self, conn: Connection, *args: Any) -> None:
        pipe = KernelPipe(conn.rule.high_water)  # first: EMFILE here refuses the client
        try:
            super().__init__(conn, *args)
        except BaseException:
            pipe.close()
            raise
        self.outgoing = pipe

    def readable(self) -> bool:
        """Read while the peer's pipe has room (its capacity is the high-water mark)."""
        return self.read_room() > 0

    def read_room(self) -> int:
        """The room in the peer's pipe; 0 or less while it must not be filled."""
        pipe = self.peer.outgoing
        if not self.conn.established or self.eof_received or pipe.blocked:
            return 0
        return pipe.capacity - len(pipe)

    def handle_read(self) -> None:
        """Called when the socket has data or EOF: splice it into the peer's pipe."""
        if not self.readable():
            return
        pipe = self.peer.outgoing
        try:
            moved = pipe.fill_from(self._fileno)
        except (BlockingIOError, InterruptedError):
            moved = 0
        except ConnectionResetError as error:
            # At an urgent mark splice() reports the reset before the urgent
            # byte that came ahead of it: relay that byte first (handle_eof).
            self.reset_error = error
            moved = 0
        except OSError as error:
            self.conn.abort(self, error)
            return
        if moved:
            self.peer.handle_write()  # pass it on now if the peer can take it
            return
        # Nothing moved: EOF (splice() returns 0), nothing to read after all,
        # a pipe full of small segments, or a TCP urgent mark, where splice()
        # stops (returning 0, or raising EAGAIN on newer kernels) and only an
        # ordinary recv() steps over the urgent byte.  With bytes in the pipe,
        # read again once it has drained a little; with an empty pipe, tell
        # the cases apart with a recv() of one byte, which surely fits.
        if pipe.queued:
            pipe.blocked = True
            return
        try:
            data = self.socket.recv(1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.conn.abort(self, error)
            return
        if data:
            pipe.push(data)
            self.peer.handle_write()
        else:
            self.handle_eof()

    def handle_write(self) -> None:
        """Called when the socket can take more: splice out the pipe, then the peer's EOF."""
        if self.outgoing:
            try:
                self.bytes_sent += self.outgoing.drain_to(self._fileno)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self.conn.abort(self, error)
                return
        if not self.outgoing and self.peer.eof_received:
            self.shutdown_write()

    def queue_first(self, data: bytes) -> None:
        """Write ``data`` into the pipe now, ahead of what the peer splices in."""
        self.outgoing.push(data)

    def close_socket(self) -> None:
        self.outgoing.close()
        super().close_socket()


class SpliceReceiver(_Splicing, Receiver):
    """The client's side, relaying with splice()."""


class SpliceSender(_Splicing, Sender):
    """The server's side, relaying with splice()."""


def splice_sides(receiver_class: Type[Receiver], sender_class: Type[Sender]) -> Tuple[Type[Receiver], Type[Sender]]:
    """The side classes of a forwarder with splice=True, given the ones it has.

    The copy relay's own classes give way to the splice ones; a subclass's
    splice classes (derived from ``SpliceReceiver``, ``SpliceSender``) are
    kept.  A subclass's copy-relay class is never silently replaced: a side
    that copies cannot be paired with one that splices (ValueError).
    """
    return _splicing(receiver_class, Receiver, SpliceReceiver), _splicing(sender_class, Sender, SpliceSender)


def _splicing(given: Type[S], copying: Type[S], splicing: Type[S]) -> Type[S]:
    if given is copying:
        return splicing
    if issubclass(given, splicing):
        return given
    raise ValueError(f"splice=True needs the sides to splice: {given.__qualname__} is not derived from "
                     f"{splicing.__name__} (derive it from {splicing.__name__}, or leave splice off)")
