"""One writer per run directory: a lock file held for the life of a training run.

The lock of ``run.out`` is the file ``.<name>.lock`` beside it (:func:`nonlocalnet.runs.layout.lock_path`;
beside, not inside, because a run with ``run.overwrite: true`` replaces the directory itself once its first
epoch is saved). It holds the owner as one JSON line: PID, host, start time and command line.

How it is held: the file is opened (created if absent) and locked with ``flock(LOCK_EX | LOCK_NB)``; the
kernel releases that lock when the process ends in any way, ``kill -9`` and power loss included, so a lock
whose holder has died is never mistaken for a live one, on this host or (on file systems that pass
``flock`` to the server, as Linux NFS does) another. After taking the lock the holder checks that the path
still names the file it locked (a releasing process unlinks it first), writes its owner line and keeps the
file open. Released on return, exception, ``SIGINT`` and ``SIGTERM`` (:func:`terminate_on_sigterm` turns
the signal into :class:`Terminated`, so ``finally`` blocks run): the file is unlinked, then unlocked.

A second writer gets :class:`RunInUseError`: ``run directory X is in use by PID n on host h since T``.
A lock file left by a killed run (present, but not locked) is taken over with a message naming the dead
owner. Where the file system does not support ``flock`` at all, the owner line decides: a live PID on this
host, or any other host (whose processes cannot be checked), refuses; a dead PID on this host is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .layout import RunDirError

__all__ = ["RunInUseError", "RunLock", "Terminated", "run_lock", "terminate_on_sigterm"]


class RunInUseError(RunDirError):
    """The run directory is being written by another process (the message names it)."""


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt: a request to stop, not an error
    """``SIGTERM`` arrived while a run was being written (raised by :func:`terminate_on_sigterm`)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"terminated by signal {signal.Signals(signum).name}")
        self.signum = signum


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process (it has not written its PID yet)"
    since = owner.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else "?"
    return f"PID {owner.get('pid', '?')} on host {owner.get('host', '?')} since {when}"


def _read_owner(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace").strip()
        owner = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _pid_alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """The lock of one run directory (use :func:`run_lock`): :meth:`acquire`, :meth:`release`."""

    def __init__(self, run_dir: str | os.PathLike, path: str | os.PathLike,
                 log: Callable[[str], None] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = Path(path)
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.fd: int | None = None

    def _refuse(self, owner: dict[str, Any] | None) -> RunInUseError:
        return RunInUseError(f"run directory {self.run_dir} is in use by {_describe(owner)}; wait for that run to "
                             f"end or choose another run.out (its lock file: {self.path})")

    def acquire(self) -> RunLock:
        if self.fd is not None:
            raise RuntimeError(f"RunLock({self.path}) is already held")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    raise self._refuse(_read_owner(fd))
                try:  # still the file at the path? (a releasing holder unlinks it before unlocking)
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = _read_owner(fd)
                owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 3),
                         "command": " ".join(sys.argv)[:500]}
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(owner) + "\n").encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            if previous:
                self.log(f"run directory {self.run_dir}: taking over the lock of {_describe(previous)}, which "
                         "ended without releasing it (killed?)")
            return self
        raise RunInUseError(f"run directory {self.run_dir}: its lock file {self.path} keeps being replaced by "
                            "other processes")

    def _lock(self, fd: int) -> bool:
        """Take the kernel lock; False when another process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        # no flock on this file system: the owner line decides
        owner = _read_owner(fd)
        if not owner:
            return True
        if owner.get("host") != socket.gethostname():
            return False  # another host's process cannot be checked from here
        return not _pid_alive(owner.get("pid")) or owner.get("pid") == os.getpid()

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Within the block, ``SIGTERM`` raises :class:`Terminated` (so locks are released and temporaries removed
    by the ``finally`` blocks on the way out). Only from the main thread, and only where ``SIGTERM`` has its
    default action (a handler the program installed itself is left alone)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, path: str | os.PathLike,
             log: Callable[[str], None] | None = None) -> Iterator[RunLock]:
    """Hold the lock of ``run_dir`` (lock file ``path``) for the block; :class:`RunInUseError` if another process
    holds it."""
    lock = RunLock(run_dir, path, log).acquire()
    try:
        yield lock
    finally:
        lock.release()
