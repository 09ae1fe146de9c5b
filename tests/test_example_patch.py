"""examples/pytorch_examples_imagenet.patch, applied as users apply it and run as users run it.

The target is PyTorch's ImageNet example, ``imagenet/main.py`` of pytorch/examples at the commit
the patch names, kept unmodified in tests/third_party/pytorch_examples (no network at test
time). Each test copies it to tmp_path, applies the patch with the real ``patch -p1`` and runs
the patched script under 2-rank torchrun on the CPU (gloo, ``--dist-url env://``):

- one process per rank (tests/example_patch_probe.py records the targets the example's train()
  and validate() consumed): each rank trains on its own share in the Loader's order for the
  epoch ``train_sampler.set_epoch`` set, and validates its slice of val;
- ``--multiprocessing-distributed`` (the example's own mp.spawn, as GPU nodes run it);
- ``--dummy``: upstream's FakeData path still trains (stopped after a few batches: its epoch
  is 1,281,167 fake images).
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PATCH = os.path.join(REPO, "examples", "pytorch_examples_imagenet.patch")
UPSTREAM = os.path.join(HERE, "third_party", "pytorch_examples")
PROBE = os.path.join(HERE, "example_patch_probe.py")
COMMIT = "77f55b912142e11fcfdf5b530231fb9c52f181e8"
BLOB = "42e5e9fa64f023f019689ab871332d5e3ffa2ab8"  # git's id of upstream imagenet/main.py
WORLD = 2
BATCH = 4
RUN_TIMEOUT = 200  # s per torchrun (a run took 15-25 s on a 2-core machine at load 5), kept
# with the stop below under the suite's 300 s per-test watchdog


def _git_blob_id(path: str) -> str:
    data = open(path, "rb").read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_upstream_copy_is_the_named_commit_and_the_patch_names_it():
    assert _git_blob_id(os.path.join(UPSTREAM, "imagenet", "main.py")) == BLOB
    header = open(PATCH).read().split("\n--- a/", 1)[0]
    assert COMMIT in header and "patch -p1" in header and "--dist-url env://" in header
    notice = open(os.path.join(UPSTREAM, "README.md")).read()
    assert COMMIT in notice and "unmodified" in notice
    assert "BSD 3-Clause" in open(os.path.join(UPSTREAM, "LICENSE")).read()


def apply_patch(dst) -> str:
    """Upstream imagenet/main.py copied to ``dst``, patched with ``patch -p1``; its path."""
    patch = shutil.which("patch")
    if patch is None:
        pytest.skip("the `patch` program is not installed (Debian/Ubuntu: apt-get install "
                    "patch); this test applies the patch file with it, as users do")
    shutil.copytree(os.path.join(UPSTREAM, "imagenet"), os.path.join(dst, "imagenet"))
    r = subprocess.run([patch, "-p1", "--batch", "--forward", "-i", PATCH], cwd=dst,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # clean: no fuzz, no offset, no rejects or backups
    assert r.stdout.strip() == "patching file imagenet/main.py", r.stdout + r.stderr
    assert os.listdir(os.path.join(dst, "imagenet")) == ["main.py"]
    return os.path.join(dst, "imagenet", "main.py")


def test_patch_applies_cleanly_and_changes_only_the_data_code(tmp_path):
    main_py = apply_patch(tmp_path)
    patched = open(main_py).read()
    upstream = open(os.path.join(UPSTREAM, "imagenet", "main.py")).read()
    assert "ImagenetLoader(args.data, 'train'" in patched
    assert "datasets.ImageFolder" in upstream and "datasets.ImageFolder" not in patched
    assert "datasets.FakeData" in patched  # --dummy kept
    # everything from validate() on (train/validate loops, meters, accuracy) is upstream's
    tail = upstream.index("def train(train_loader")
    assert patched.endswith(upstream[tail:])
    compile(patched, main_py, "exec")


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop torchrun and the processes it started (they run in sessions of their own)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for c in children:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)


def torchrun(args, cwd, until=None, timeout=RUN_TIMEOUT):
    """``torchrun --standalone --nproc_per_node 2 --tee 3 ARGS`` in ``cwd``.

    Returns (returncode, output); returncode None when ``until(output)`` became true first and
    the run was stopped then. Past ``timeout`` the run is stopped and the test fails with its
    output.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", "--tee=3"] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    stopped = timed_out = False
    try:
        while proc.poll() is None:
            if until is not None and until("".join(lines)):
                stopped = True
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.5)
    finally:
        _kill_tree(proc)
    reader.join(timeout=30)
    out = "".join(lines)
    assert not timed_out, f"torchrun ran past {timeout} s; stopped. Its output:\n" + out[-6000:]
    if stopped:
        return None, out
    return proc.returncode, out


def rank_lines(out: str, rank: int):
    """What rank ``rank`` printed (torchrun --tee prefixes each line with [default<rank>]:)."""
    prefix = f"[default{rank}]:"
    return [line[len(prefix):] for line in out.splitlines() if line.startswith(prefix)]


def _progress(lines, prefix):
    """(batch, of) for each progress line ``prefix[ b/n]`` the example printed."""
    pat = re.compile(re.escape(prefix) + r"\[\s*(\d+)/(\d+)\]")
    return [(int(m.group(1)), int(m.group(2))) for m in map(pat.match, lines) if m]


def _summaries(lines):
    return [line.strip() for line in lines if line.startswith(" * ")]


def _example_args(lmdb, epochs):
    return [lmdb, "--dist-url", "env://", "--dist-backend", "gloo", "-a", "resnet18",
            "--epochs", epochs, "-b", BATCH, "-j", 1, "-p", 1]


@pytest.mark.slow
def test_each_rank_trains_on_its_share_in_set_epoch_order_and_validates_its_slice(
        sample_lmdb, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    from imagenet_seq.data import Loader

    main_py = apply_patch(tmp_path / "src")
    run = tmp_path / "run"  # the example writes its checkpoints into the working directory
    run.mkdir()
    epochs = 2
    rc, out = torchrun([PROBE, main_py, run] + _example_args(sample_lmdb, epochs), cwd=run)
    assert rc == 0, out[-6000:]

    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(WORLD))  # as torchrun told each rank
    summaries = []
    for rank in range(WORLD):
        train = Loader(sample_lmdb, "train", batch_size=BATCH, num_workers=0, rank=rank,
                       world_size=WORLD)
        val = Loader(sample_lmdb, "val", batch_size=BATCH, num_workers=0, rank=rank,
                     world_size=WORLD)
        n_train, n_val = len(train), len(val)  # batches of this rank's share
        consumed = json.load(open(run / f"consumed-rank{rank}.json"))
        # per epoch: the whole train share, then the whole val slice
        phases = [phase for phase, _ in consumed]
        assert phases == (["train"] * n_train + ["val"] * n_val) * epochs
        per_epoch = n_train + n_val
        train_targets = []
        for e in range(epochs):
            batches = consumed[e * per_epoch:(e + 1) * per_epoch]
            got_train = [t for _, b in batches[:n_train] for t in b]
            got_val = [t for _, b in batches[n_train:] for t in b]
            assert got_train == train.reader.labels[train.epoch_order(e)].tolist()
            assert got_val == val.reader.labels[val.epoch_order(e)].tolist()
            train_targets.append(got_train)
        assert len(train_targets[0]) == train.dataset_size // WORLD
        assert train_targets[0] != train_targets[1]  # set_epoch(1) gave epoch 1's order
        lines = rank_lines(out, rank)
        for e in range(epochs):
            assert (n_train, n_train) in _progress(lines, f"Epoch: [{e}]")
        assert (n_val, n_val) in _progress(lines, "Test: ")
        summaries.append(_summaries(lines))
        train.close()
        val.close()
    # validate()'s all_reduce: both ranks report the same accuracy over all val images
    assert len(summaries[0]) == epochs and summaries[0] == summaries[1]
    assert (run / "checkpoint.pth.tar").exists()


@pytest.mark.slow
def test_multiprocessing_distributed_under_torchrun(sample_lmdb, tmp_path):
    """What GPU nodes run: torchrun starts one process per node, the example mp.spawns one per
    device (here: 2 "nodes" of 1 CPU device each, on one machine)."""
    pytest.importorskip("torchvision")
    from imagenet_seq.data import Loader

    main_py = apply_patch(tmp_path / "src")
    run = tmp_path / "run"
    run.mkdir()
    rc, out = torchrun([main_py] + _example_args(sample_lmdb, 1)
                       + ["--multiprocessing-distributed"], cwd=run)
    assert rc == 0, out[-6000:]
    share = Loader(sample_lmdb, "train", batch_size=BATCH, num_workers=0, rank=0,
                   world_size=WORLD)
    n_train = len(share)
    share.close()
    val = Loader(sample_lmdb, "val", batch_size=BATCH, num_workers=0, rank=0, world_size=WORLD)
    n_val = len(val)
    val.close()
    summaries = []
    for rank in range(WORLD):
        lines = rank_lines(out, rank)
        assert (n_train, n_train) in _progress(lines, "Epoch: [0]")
        assert (n_val, n_val) in _progress(lines, "Test: ")
        summaries.append(_summaries(lines))
    assert len(summaries[0]) == 1 and summaries[0] == summaries[1]
    assert (run / "checkpoint.pth.tar").exists()


@pytest.mark.slow
def test_dummy_still_trains_on_fake_data(tmp_path):
    pytest.importorskip("torchvision")
    main_py = apply_patch(tmp_path / "src")
    run = tmp_path / "run"
    run.mkdir()
    batches = 3
    # upstream's --dummy ignores DIR: a folder that does not exist proves no Loader is made
    args = [main_py, tmp_path / "no-such-folder", "--dummy", "--dist-url", "env://",
            "--dist-backend", "gloo", "-a", "resnet18", "-b", 2, "-j", 1, "-p", 1]

    def trained(out):
        return all(any(b >= batches for b, _ in _progress(rank_lines(out, r), "Epoch: [0]"))
                   for r in range(WORLD))

    rc, out = torchrun(args, cwd=run, until=trained)
    assert rc is None, f"exit status {rc} before {batches} batches:\n" + out[-6000:]
    # DistributedSampler over FakeData(1281167): ceil(1281167 / 2) images per rank, batches of 2
    per_rank = -(-1281167 // WORLD)
    for rank in range(WORLD):
        lines = rank_lines(out, rank)
        assert "=> Dummy data is used!" in lines
        progress = _progress(lines, "Epoch: [0]")
        assert [b for b, _ in progress[:batches]] == list(range(1, batches + 1))
        assert {n for _, n in progress} == {-(-per_rank // 2)}
