"""Faults of the converter's temporary runs, for its tests: a run write that fails (a full or
failing scratch disk), and a kill -9 while pass 1 writes them."""
from imagenet_seq.convert import sort_runs

# Prelude of a converter subprocess (run before its CLI): SIGKILL as the third run write
# starts, i.e. in pass 1 with runs committed before it.
KILL_IN_READ = """
import os, signal, imagenet_seq.convert.passes as cp
_start, _n = cp.RunWriter.start, [0]
def _s(self, run):
    _n[0] += 1
    if _n[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    _start(self, run)
cp.RunWriter.start = _s
"""

# Prelude: SIGKILL as pass 2's merge yields its record ``{at}`` (``.format(at=N)``).
KILL_IN_MERGE = """
import os, signal, imagenet_seq.convert.passes as cp
_merge = cp.merge
def _killing(*a, **k):
    for i, rec in enumerate(_merge(*a, **k)):
        if i == {at}:
            os.kill(os.getpid(), signal.SIGKILL)
        yield rec
cp.merge = _killing
"""


def fail_nth_run_write(monkeypatch, n, err, before=None):
    """Make the ``n``-th ``RunBuffer.write`` raise ``err`` (after ``before()``, if given); the
    others write. Returns the list of run paths written or tried, in call order."""
    real, calls = sort_runs.RunBuffer.write, []

    def write(self, path, *rest):
        calls.append(path)
        if len(calls) == n:
            if before is not None:
                before()
            raise err
        return real(self, path, *rest)
    monkeypatch.setattr(sort_runs.RunBuffer, "write", write)
    return calls
