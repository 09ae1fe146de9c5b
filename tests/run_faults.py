"""A temporary run write that fails (a full or failing scratch disk), for the converter's tests."""
from imagenet_seq.convert import sort_runs


def fail_nth_run_write(monkeypatch, n, err, before=None):
    """Make the ``n``-th ``RunBuffer.write`` raise ``err`` (after ``before()``, if given); the
    others write. Returns the list of run paths written or tried, in call order."""
    real, calls = sort_runs.RunBuffer.write, []

    def write(self, path):
        calls.append(path)
        if len(calls) == n:
            if before is not None:
                before()
            raise err
        return real(self, path)
    monkeypatch.setattr(sort_runs.RunBuffer, "write", write)
    return calls
