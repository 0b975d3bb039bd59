"""The pid file: claimed once listening, removed at exit if it is still ours.

Strategy: the pid is written to a new temporary file next to the pid file,
made mode 0644 whatever the umask, and published under the pid file's name
with ``link()``.  A pid file that names another running process stops the
start (``check`` before binding, ``claim`` again once listening); one that
names a dead process, or holds anything but a pid, is stale and replaced.
A symbolic link or anything but a regular file at the name is refused, never
followed or written through.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from typing import Optional, Tuple

from .._net import describe_error

__all__ = ["PidFileError", "check", "claim", "release"]

log = logging.getLogger("asyncore_fwd")

#: More than this many bytes is not a pid file of ours: garbage.
MAX_SIZE = 32
#: Stale files replaced at most, when another process keeps writing one.
ATTEMPTS = 3

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO there must not hang us


class PidFileError(OSError):
    """The pid file cannot be ours; its message is the one line to show."""


def check(path: str) -> None:
    """PidFileError if ``path`` names another running process or cannot be a pid file; OSError if unreadable."""
    found = _open_stale(path)
    if found is not None:
        os.close(found[0])


def claim(path: str) -> None:
    """Write our pid to ``path``, replacing a stale pid file; PidFileError (a
    one-line message) if it names another running process or cannot be written."""
    directory, name = os.path.split(path)
    try:
        # Not the name itself with O_CREAT|O_EXCL|O_NOFOLLOW: between its open
        # and its write the file would be empty, which another instance
        # starting then would take for garbage and replace.  Nor rename(),
        # which replaces whatever is there, a running instance's file too.
        # link() publishes the whole file, only if the name is free, and never
        # follows a symbolic link there; mkstemp() makes the temporary file
        # with O_CREAT|O_EXCL|O_NOFOLLOW.
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    except OSError as error:
        raise _error(path, describe_error(error), error.errno) from None
    try:
        with os.fdopen(fd, "w") as file:
            os.fchmod(file.fileno(), 0o644)  # readable by all, writable by us only, whatever the umask
            file.write(f"{os.getpid()}\n")
        for _ in range(ATTEMPTS):
            try:
                os.link(temporary, path)
                return
            except FileExistsError:
                pass
            found = _open_stale(path)
            if found is not None:
                log.info("replacing the stale pid file %s (%s)", path, found[1])
                _remove(path, found[0])
        raise _error(path, "another process keeps writing it")
    except PidFileError:
        raise
    except OSError as error:
        raise _error(path, describe_error(error), error.errno) from None
    finally:
        try:
            os.unlink(temporary)
        except OSError:
            pass


def release(path: str) -> None:
    """Remove the pid file at ``path`` if it still holds our pid (not one another process wrote since)."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return  # gone, or a link put there since: not ours
    try:
        ours = stat.S_ISREG(os.fstat(fd).st_mode) and _named_pid(os.read(fd, MAX_SIZE + 1)) == os.getpid()
    except OSError:
        ours = False
    if not ours:
        os.close(fd)
        log.warning("left the pid file %s in place: it no longer holds this process's id", path)
        return
    _remove(path, fd)


def _open_stale(path: str) -> Optional[Tuple[int, str]]:
    """The pid file at ``path``, open, and why it is stale; None if there is none.
    PidFileError if it names another running process or is no regular file."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            raise _error(path, "it is a symbolic link (not followed)") from None
        raise _error(path, describe_error(error), error.errno) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _error(path, "it is not a regular file")
        pid = _named_pid(os.read(fd, MAX_SIZE + 1))
        if pid is None:
            return fd, "it holds no process id"
        if pid == os.getpid():  # a restart that got the same pid, as pid 1 in a container
            return fd, "it names this process"
        if _running(pid):
            raise PidFileError(errno.EEXIST, f"the pid file {path} names process {pid}, which is running: "
                                             f"stop it first, or remove the file if it is not a forwarder")
        return fd, f"process {pid} is not running"
    except BaseException:
        os.close(fd)
        raise


def _named_pid(text: bytes) -> Optional[int]:
    """The process id a pid file's text names; None for anything else."""
    digits = text.strip()
    if not digits.isdigit() or len(digits) > 10:  # (bytes.isdigit() takes ASCII digits only)
        return None
    return int(digits) or None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    except (OverflowError, OSError):
        return False
    return True


def _remove(path: str, fd: int) -> None:
    """Unlink ``path`` if it still is the file open at ``fd``; close ``fd``.
    (Held open, the file keeps its inode number: no new file can have it.)"""
    try:
        if os.path.samestat(os.lstat(path), os.fstat(fd)):
            os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _error(path: str, reason: str, code: Optional[int] = None) -> PidFileError:
    return PidFileError(code or errno.EPERM, f"cannot write the pid file {path}: {reason}")
