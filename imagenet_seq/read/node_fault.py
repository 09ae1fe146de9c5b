"""What a rank does when its node reader reports a fault, so that a DDP job never hangs on it.

A fault (another local rank died, the node reader died, a damaged record) reaches a rank's
:class:`~imagenet_seq.read.node_client.NodeClient` on its receiving thread. The Loader's next
batch raises it -- but a trainer blocked in a collective never asks for that batch: NCCL's
all-reduce waits for a dead rank for ever (gloo notices a closed peer, with an error that names
an address, not the rank), and only torchrun's agent, not ``mp.spawn`` or a hand-made launcher,
would end the job. So on a fault (:func:`fault`) this process:

1. writes one line on stderr at once, naming the dead rank (or the reader) and what follows;
2. lets the next batch raise the error (the training loop *takes* it: :func:`taken`);
3. if nothing took it within the grace period -- ``IMAGENET_SEQ_FAULT_GRACE_S`` seconds,
   default :data:`DEFAULT_GRACE_S` (``off``: never) -- ends itself: its child processes
   (decode workers, a node reader it started, anything it forked) get ``SIGTERM`` and, after
   :data:`CHILDREN_S`, ``SIGKILL``; the error goes to torchrun's error file
   (``TORCHELASTIC_ERROR_FILE``, when torchrun set one and nothing wrote it yet) and to stderr;
   the process exits with status :data:`EXIT_STATUS`.

Why ``os._exit(1)``: the trainer's main thread is inside a C++ call (the collective), where
Python runs no signal handler and raises nothing, and ``sys.exit`` from this thread would end
only this thread; exit handlers could block on the same dead peer (``destroy_process_group``,
joins). Status 1 is what an uncaught Python error gives: torchrun records the worker as failed
with our error file's message (and tears the job down or restarts it, as for any failure),
``mp.spawn``'s parent raises "process N terminated with exit code 1" and terminates the other
ranks. Not a signal to ourselves: torchrun would report "Signal 9 (SIGKILL) received", which
reads like the OOM killer, and ``SIGABRT`` may write a core file.

Once the training loop has taken a fault, later ones (the same fault seen by a second Loader)
are only logged: the loop knows the job is broken and decides itself how it ends.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import List, Optional

__all__ = ["GRACE_ENV", "DEFAULT_GRACE_S", "EXIT_STATUS", "CHILDREN_S", "grace_s", "fault",
           "taken", "raised", "pending", "descendants"]

#: The environment variable that sets the grace period (seconds, or ``off``).
GRACE_ENV = "IMAGENET_SEQ_FAULT_GRACE_S"
#: Seconds a fault may wait for the training loop before the process ends itself.
DEFAULT_GRACE_S = 10.0
#: The status a process ended by a fault exits with (as for an uncaught Python error).
EXIT_STATUS = 1
#: Seconds the children get between ``SIGTERM`` and ``SIGKILL``.
CHILDREN_S = 2.0
_OFF = ("off", "none", "never", "inf")

_lock = threading.Lock()
_armed: List[BaseException] = []  # faults not yet taken (the first one's timer runs)
_said: set = set()  # messages already written (two Loaders get the same fault)
_taken_any = False
_disarmed = threading.Event()


def _reset_after_fork() -> None:  # a forked child (a decode worker) is not the trainer
    global _lock, _taken_any, _disarmed
    _lock, _taken_any, _disarmed = threading.Lock(), False, threading.Event()
    _armed.clear()
    _said.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def grace_s(environ=None) -> Optional[float]:
    """The grace period from ``IMAGENET_SEQ_FAULT_GRACE_S`` (None: never end the process).

    Raises:
        ValueError: the variable is neither a number >= 0 nor ``off``.
    """
    value = (os.environ if environ is None else environ).get(GRACE_ENV, "").strip()
    if not value:
        return DEFAULT_GRACE_S
    if value.lower() in _OFF:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{GRACE_ENV}={value!r}; expected the seconds a rank waits for its "
                         "training loop to take a node reader's error before it ends itself "
                         f"(a number >= 0, default {DEFAULT_GRACE_S:g}), or 'off' (never)")
    return seconds


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # stderr closed or replaced
        try:
            os.write(2, (line + "\n").encode(errors="replace"))
        except OSError:
            pass


def fault(error: BaseException, who: str, grace: Optional[float]) -> None:
    """A fault reached this process (called from a node client's receiving thread): say it
    now, and end the process after ``grace`` seconds unless the loop takes it first."""
    with _lock:
        new = str(error) not in _said
        _said.add(str(error))
        arm = grace is not None and not _taken_any
        first = arm and not _armed
        if arm:
            _armed.append(error)
    if new:
        then = ("this process goes on (nothing ends it: "
                f"{GRACE_ENV}=off)" if grace is None else
                "the training loop has taken an earlier error" if not arm else
                f"if the training loop has not taken it in {grace:g} s (a rank blocked in a "
                "collective, e.g. DDP's all-reduce, never does), this process ends with status "
                f"{EXIT_STATUS} ({GRACE_ENV} sets the wait, 'off' never ends it)")
        _say(f"imagenet_seq: {who}: {type(error).__name__}: {error} -- the next batch raises "
             f"this error; {then}")
    if first:
        threading.Thread(target=_watch, args=(error, who, grace), daemon=True,
                         name="imagenet_seq-fault-watch").start()


def taken(error: BaseException) -> None:
    """The training loop's thread is raising ``error`` (or an error caused by it): a pending
    end of the process for it stands down, and so do the others (the loop knows now)."""
    global _taken_any
    chain, seen = error, 0
    with _lock:
        while chain is not None and seen < 16:
            if any(chain is e for e in _armed):
                _taken_any = True
                _armed.clear()
                _disarmed.set()
                return
            chain, seen = chain.__cause__ or chain.__context__, seen + 1


def raised(error: BaseException) -> None:
    """``error`` leaves a node client's read in the current thread: taken, unless the thread
    is one of imagenet_seq's own (the Loader's reading thread, named ``imagenet_seq-*``),
    which hands it on to the loop's next batch (:func:`taken` is called there)."""
    if not threading.current_thread().name.startswith("imagenet_seq-"):
        taken(error)


def pending() -> Optional[BaseException]:
    """The fault whose grace period runs, if any (for tests and diagnostics)."""
    with _lock:
        return _armed[0] if _armed else None


def _watch(error: BaseException, who: str, grace: float) -> None:
    if _disarmed.wait(grace):
        return
    with _lock:
        if not _armed:  # taken at the last moment
            return
    _end(error, who, grace)


def _end(error: BaseException, who: str, grace: float) -> None:
    """Children first (no orphan), then the error where the launcher looks, then exit."""
    _say(f"imagenet_seq: {who}: ending this process (status {EXIT_STATUS}): the training loop "
         f"did not take the node reader's error within {grace:g} s ({GRACE_ENV}): "
         f"{type(error).__name__}: {error}")
    try:
        _stop_children()
    finally:
        _record_for_torchrun(error)
        os._exit(EXIT_STATUS)


def _children_map() -> dict:
    """{parent pid: [child pids]} of every process visible in /proc."""
    out: dict = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(name))
    return out


def descendants(pid: Optional[int] = None) -> List[int]:
    """Every process below ``pid`` (default: this one), parents before their children."""
    tree, out, todo = _children_map(), [], [os.getpid() if pid is None else pid]
    while todo:
        kids = tree.get(todo.pop(0), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_children() -> None:
    # the whole tree, taken before any signal: a killed parent's children move to init
    procs = descendants()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in procs:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + CHILDREN_S
        while sig == signal.SIGTERM and time.monotonic() < deadline and \
                any(_alive(p) for p in procs):
            time.sleep(0.02)
        procs = [p for p in procs if _alive(p)]
        if not procs:
            return


def _record_for_torchrun(error: BaseException) -> None:
    """torchrun's per-worker error file (its failure summary shows the message), in the
    format of ``torch.distributed.elastic``'s ``ErrorHandler``; never overwrites one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    message = f"{type(error).__name__}: {error}"
    data = {"message": {"message": message,  # torchrun's summary shows the py_callstack
                        "extraInfo": {"py_callstack": f"{message}\n(ended by imagenet_seq's "
                                                      "node reader fault watch: the training "
                                                      "loop did not take this error)",
                                      "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass
