"""The output folder's conversion lock: one conversion at a time per folder, and who holds it.

A conversion holds an exclusive ``flock`` on ``<output folder>/.convert.lock`` from before it
writes anything there until it ends (the kernel drops the lock when the process dies, even by
``kill -9``). The file holds the holder's PID, host, start time and command, so a second
conversion into the same folder (plain, ``--resume`` or ``--overwrite``) is refused naming it,
and readers that meet an unfinished conversion (``ILSVRC-<split>.lmdb.partial``) can say whether
it is being written now (lock held: wait) or was abandoned (lock free: ``--resume`` is safe).

The holder deletes the file before it lets go of the lock; a process that locked a file just
deleted (it had opened it before) sees that its inode is no longer the path's and tries again,
so two holders at once cannot happen. Readers only probe (a shared lock taken and dropped at
once); the converter retries a busy lock for about a second before refusing, so a probe never
turns a conversion away. Forked children (the converter's workers) close their inherited
copies at fork, so a stray child never keeps a dead conversion's folder locked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Dict, Optional

__all__ = ["ABANDONED", "LOCK_NAME", "Busy", "ConversionLock", "holder", "describe_unfinished"]

LOCK_NAME = ".convert.lock"
RETRY_SECONDS = 1.0
ABANDONED = ("no conversion is running on it (the one that wrote it stopped), so "
             "preprocess_sequential.py --resume is safe: it continues where that one stopped")  # a reader's probe lasts microseconds; a conversion holds it for hours

# real path of the lock file -> [fd, references, whether acquire made the folder] (this process)
_HELD: Dict[str, list] = {}
_HELD_LOCK = threading.Lock()


class Busy(RuntimeError):
    """Another live process holds the folder's conversion lock; the message names it."""

    def __init__(self, message: str, info: dict):
        super().__init__(message)
        self.info = info


def _after_fork_in_child() -> None:
    # close (never LOCK_UN: that would release the parent's lock, the open file is shared)
    for fd, *_ in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def lock_path(folder: str) -> str:
    return os.path.join(folder, LOCK_NAME)


def _read_info(path: str) -> dict:
    """What the holder wrote (it writes right after locking: a fresh file may be empty)."""
    for _ in range(20):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            return {}
        if text:
            try:
                info = json.loads(text)
                return info if isinstance(info, dict) else {}
            except ValueError:
                return {}
        time.sleep(0.01)
    return {}


def _who(info: dict) -> str:
    if not info.get("pid"):
        return "another process (its PID is not written yet)"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    started = info.get("started")
    when = (f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
            if isinstance(started, (int, float)) else "")
    cmd = info.get("command")
    return f"PID {info['pid']}{where}{when}" + (f": {cmd}" if cmd else "")


def holder(folder: str) -> Optional[dict]:
    """What the live conversion holding ``folder``'s lock wrote about itself (``pid``,
    ``host``, ``started``, ``command``; ``{}`` if not yet written), or None when no conversion
    holds it (no lock file, or its holder is gone). This process's own lock counts as held."""
    path = lock_path(folder)
    with _HELD_LOCK:
        if os.path.realpath(path) in _HELD:
            return _read_info(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(path)
        except OSError:
            return None  # a filesystem without flock: nothing can be said
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_unfinished(partial: str) -> str:
    """The end of an 'unfinished conversion' message: live (wait) or abandoned (resume)."""
    info = holder(os.path.dirname(os.path.abspath(partial)))
    if info is not None:
        return (f"a conversion is writing it now ({_who(info)}): wait for it to finish, or stop "
                "it and run preprocess_sequential.py --resume")
    return ABANDONED


class ConversionLock:
    """The exclusive lock of one output folder, held by this process (re-entrant within it:
    the CLI holds it for the whole run, ``convert_split`` takes it again for library callers).

    Use :meth:`acquire` / :meth:`release`, or as a context manager.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = lock_path(folder)
        self._key: Optional[str] = None

    def __enter__(self) -> "ConversionLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, creating the folder if needed.

        Raises:
            Busy: a live process holds it (the message names it and the way out).
            OSError: the folder cannot be created or written.
        """
        made = not os.path.isdir(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        key = os.path.realpath(self.path)
        with _HELD_LOCK:
            if key in _HELD:
                _HELD[key][1] += 1
                self._key = key
                return
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                info = _read_info(self.path)
                raise Busy(
                    f"{self.folder} is being written by another conversion ({_who(info)}; it "
                    f"holds {self.path}); two conversions into one folder would destroy each "
                    "other's files, so this one stops before writing anything. Wait for it to "
                    "finish, or stop it"
                    + (f" (kill {info['pid']})" if info.get("pid") else "")
                    + " and then run again with --resume (its finished work is kept)",
                    info) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    import warnings

                    warnings.warn(f"{self.folder}: this filesystem does not support file "
                                  f"locks ({e.strerror}); do not start two conversions into "
                                  "this folder at once")
                    return
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder deleted it between our open and our lock: again
                os.close(fd)
                continue
            break
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        with _HELD_LOCK:
            _HELD[key] = [fd, 1, made]
        self._key = key

    def release(self) -> None:
        """Drop one reference; the last one deletes the lock file, then unlocks."""
        key, self._key = self._key, None
        if key is None:
            return
        with _HELD_LOCK:
            entry = _HELD.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[key]
        try:
            os.remove(self.path)  # while still locked: see the module docstring
        except OSError:
            pass
        os.close(entry[0])
        if entry[2]:  # made by this lock and nothing was written (e.g. a bad input): gone
            try:
                os.rmdir(self.folder)
            except OSError:
                pass
