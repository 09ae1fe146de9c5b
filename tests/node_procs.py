"""Real rank processes for the node-reader tests: start them, wait for them, and check that
nothing is left behind -- shared by tests/test_node_*.py (the parent side) and the rank
scripts tests/node_ranks.py, tests/node_loader_ranks.py (the rank side: results, progress).

Every wait has a limit only so that a hang fails the test (no timing is asserted).
"""
import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LIMIT_S = 180  # a rank that takes longer has hung
#: The ranks' environment: this checkout first on the path, no launcher's or user's settings.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
    [os.path.dirname(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                               if p]))
for _k in ("IMAGENET_SEQ_NODE_READER", "IMAGENET_SEQ_FAULT_GRACE_S", "LOCAL_WORLD_SIZE",
           "LOCAL_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
           "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"):
    ENV.pop(_k, None)


# --------------------------------------------------------------------------- the parent side
def sample_lmdb(tmp_path_factory, name, **sample):
    """A converted split of ``make_sample_imagefolder(**sample)`` (a module fixture's data)."""
    from imagenet_seq.convert.cli import main
    from imagenet_seq.tools.sample import make_sample_imagefolder

    root = tmp_path_factory.mktemp(f"{name}_src")
    make_sample_imagefolder(str(root), **sample)
    out = str(tmp_path_factory.mktemp(f"{name}_lmdb"))
    assert main([str(root), out, "--workers", "0", "--no-progress"]) == 0
    return out


def spawn(script, out, argv, env=None):
    """``python tests/<script> ... argv`` with its stderr in ``out + '.err'`` (a file: a reader
    the rank starts inherits it); returns ``(Popen, out)``."""
    with open(out + ".err", "w") as err:
        return subprocess.Popen([sys.executable, os.path.join(HERE, script)] + list(argv),
                                env=ENV if env is None else env, stderr=err), out


def start(root, tmp, world, local, job, ranks=None, args=(), env=None):
    """NodeClient ranks (tests/node_ranks.py), their place given as arguments:
    ``{rank: (Popen, out)}``."""
    return {r: spawn("node_ranks.py", str(tmp / f"{job}-r{r}.json"),
                     [root, str(tmp / f"{job}-r{r}.json"), "--rank", str(r), "--world-size",
                      str(world), "--local-world-size", str(local), "--job", job] + list(args),
                     env)
            for r in (range(world) if ranks is None else ranks)}


def launch(root, tmp, world, local, tag, args=(), ranks=None, extra=None, per_rank=None):
    """Loader ranks (tests/node_loader_ranks.py) as torchrun starts them (its environment, plus
    ``extra``), one job key per ``tag``; ``per_rank``: more arguments of some ranks."""
    procs = {}
    for r in (range(world) if ranks is None else ranks):
        out = str(tmp / f"{tag}-r{r}.json")
        env = dict(ENV, RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(local),
                   LOCAL_RANK=str(r % local), GROUP_RANK=str(r // local),
                   TORCHELASTIC_RUN_ID=f"{tag}-{os.getpid()}", **(extra or {}))
        more = list((per_rank or {}).get(r, ()))
        procs[r] = spawn("node_loader_ranks.py", out, [root, out] + list(args) + more, env)
    return procs


def finish(procs, timeout=LIMIT_S):
    """Wait for every rank of ``{rank: (Popen, out)}``; returns {rank: its JSON}, with its
    ``stderr`` and exit ``status`` added."""
    results = {}
    for r, (p, out) in procs.items():
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs.values():
                q.kill()
            raise
        err = open(out + ".err").read()
        assert os.path.exists(out), f"rank {r} wrote nothing (status {p.returncode}): {err}"
        results[r] = json.load(open(out))
        results[r].update(stderr=err, status=p.returncode)
    return results


def state(pid):
    """A process's state letter ('R', 'S', 'Z', ...), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def wait_gone(pid, timeout=LIMIT_S):
    deadline = time.monotonic() + timeout
    while state(pid) not in (None, "Z"):  # gone, or ended and not yet reaped by its parent
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def our_names():
    """Abstract socket names of node readers (and their start rights) now bound."""
    with open("/proc/net/unix") as f:
        return {line.split()[-1] for line in f if "@imagenet_seq/" in line}


def shm():
    """/dev/shm entries a reader could have made (named segments: ours, or Python's
    ``shared_memory``); other processes on a shared machine make their own, not counted."""
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return {n for n in names if "imagenet_seq" in n or n.startswith(("psm_", "wnsm_"))}


def left_behind(names, dev_shm, timeout=LIMIT_S):
    """What is still there, of reader socket names and /dev/shm entries, that was not before
    (waits: an exiting process's last thread may still be closing its files)."""
    deadline = time.monotonic() + timeout
    while True:
        extra = (our_names() - names) | (shm() - dev_shm)
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)


def wait_file(path, timeout=LIMIT_S):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.05)
    return open(path).read()


def wait_progress(outs, at_least, timeout=LIMIT_S):
    """Until every rank's ``OUT.progress`` counts ``at_least`` (so every rank is connected)."""
    for out in outs:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if int(open(out + ".progress").read() or 0) >= at_least:
                    break
            except (OSError, ValueError):
                pass
            assert time.monotonic() < deadline, f"{out}: no progress"
            time.sleep(0.05)


class Direct:
    """A rank's own SplitReader where the node client would be: the per-rank path reading the
    node plan's spans (the reference the node reader must equal)."""

    def __init__(self, reader):
        self.split_reader = reader

    def __getattr__(self, name):
        return getattr(self.split_reader, name)

    def __len__(self):
        return len(self.split_reader)

    def shutdown(self):
        self.split_reader.close()


# ----------------------------------------------------------------------------- the rank side
def new_epoch() -> dict:
    """What a rank records of one epoch: :func:`add_batch` fills it."""
    return dict(records=[], targets=[], pixels=[])


def add_batch(got: dict, loader, images, targets) -> None:
    """One batch into ``got``: its record ids, targets and a digest of its pixels."""
    got["records"].append([int(r) for r in loader.last_batch_records])
    got["targets"].append(targets.tolist())
    got["pixels"].append(hashlib.sha1(images.numpy().tobytes()).hexdigest())


def error_entry(e):
    """How a rank reports an error to the test: type, message, when."""
    return dict(type=type(e).__name__, message=str(e), at=time.time())


def write_result(out, result):
    """The rank's JSON, whole or not at all (the test reads it after the rank exits)."""
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)


def write_progress(out, count):
    with open(out + ".progress", "w") as f:
        f.write(str(count))
