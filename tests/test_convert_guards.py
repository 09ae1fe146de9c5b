"""Where a conversion writes, and who else writes there (issue 22, items 3-5 and messages).

Every case drives the real CLI (a subprocess under a timeout, or ``main(argv)``) on a tiny
tree, asserts the exit code and the words of the message, and, where records are stored, that
they equal a clean conversion's record by record:

* output (or ``--tmp``) inside a split's source folder: refused before anything is written,
  naming both paths; the advice moves the user's folder, never deletes it, and works;
* two conversions into one folder: the second (plain, ``--resume``, ``--overwrite``) is refused
  naming the first's PID while the first is paused by SIGSTOP; the first then finishes with
  the clean records; after a kill -9, readers and the converter say ``--resume`` is safe;
* a folder named like a split (an LMDB made with ``subdir=True``): the Loader, split
  discovery, imagenet-seq-verify and the converter name it and the way out, no traceback;
* a full disk in the merge says so and names the folder; the output disk is checked first when
  ``--tmp`` is elsewhere; an output path that is a file is called a file.
"""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import lmdb
import pytest

from imagenet_seq import format as fmt
from imagenet_seq.convert.cli import main
from imagenet_seq.convert.guards import write_failure
from imagenet_seq.data import Loader
from imagenet_seq.read.reader import SplitReader
from imagenet_seq.tools.sample import make_sample_imagefolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 90  # far above any run here (~1-2 s): reaching it means a hang
# small commits and runs: a 24-image split is cut into several of each
SMALL = "import imagenet_seq.convert.passes as cp\ncp.COMMIT_RECORDS = 4\ncp.RUN_RECORDS = 7\n"


def _stop_at(stage: str, at: int, marker: str, sig: str) -> str:
    """Prelude: after ``at`` items of pass 1 (``results``) or pass 2 (``merge``), touch
    ``marker`` and send this process ``sig`` (SIGSTOP: paused; SIGKILL: dead)."""
    name = {"read": "results", "merge": "merge"}[stage]
    return SMALL + f"""
import os, signal
_real = cp.{name}
def _paused(*a, _real=_real, **k):
    for n, item in enumerate(_real(*a, **k)):
        if n == {at}:
            open({marker!r}, "w").close()
            os.kill(os.getpid(), signal.{sig})
        yield item
cp.{name} = _paused
"""


def _code(prelude: str) -> str:
    return ("import sys\n" + prelude + "from imagenet_seq.convert.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


def cli(args, prelude=""):
    """The converter in a subprocess under a timeout: (exit code, stderr)."""
    try:
        p = subprocess.run([sys.executable, "-c", _code(prelude), *args, "--no-progress"],
                           cwd=REPO, capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang: converter {args} still running after {TIMEOUT} s")
    err = p.stderr.decode("utf-8", "backslashreplace")
    assert p.returncode >= 0, f"converter died of signal {-p.returncode}: {err}"
    assert "Traceback" not in err, err
    return p.returncode, err


def records(out, split="train"):
    """Everything a conversion decides: records in order with labels, and the metadata."""
    r = SplitReader(out, split)
    try:
        recs = [(bytes(j), lab) for _, j, lab in r.read_all()]
        meta = {k: getattr(r.meta, k) for k in ("classes", "class_counts", "num_records",
                                                 "total_bytes", "skipped", "options")}
        return {"records": recs, "labels": [int(x) for x in r.labels], "meta": meta}
    finally:
        r.close()


def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, files in os.walk(folder) for f in files)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 8 small JPEGs (train), 2 per class (val)."""
    root = str(tmp_path_factory.mktemp("guards") / "S")
    make_sample_imagefolder(root, train_per_class=8, val_per_class=2, num_classes=3,
                            size=(64, 48))
    return root


@pytest.fixture(scope="module")
def clean(tree, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clean") / "out")
    assert main([tree, out, "--splits", "train", "--workers", "0", "--no-progress"]) == 0
    return out, records(out)


def _wait_for(marker: str, proc: subprocess.Popen, stopped: bool) -> None:
    """Until ``marker`` exists and (if ``stopped``) ``proc`` is in the stopped state."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if os.path.exists(marker):
            if not stopped:
                return
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    return
        if proc.poll() is not None and not stopped:
            return
        if proc.poll() is not None:
            pytest.fail(f"the first conversion ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    pytest.fail("the first conversion never reached its pause point")


# ---------------------------------------------------------------- 3. output inside the input

def test_output_inside_a_split_folder_is_refused_before_writing(tree, tmp_path):
    root = str(tmp_path / "S")
    shutil.copytree(tree, root)
    before = listing(root)
    for out in (os.path.join(root, "train", "zz_out"), os.path.join(root, "val"),
                os.path.join(root, "train", "n0", "deeper", "out")):
        rc, err = cli([root, out, "--splits", "train", "--workers", "0"])
        assert rc == 2, err
        split_dir = os.path.join(root, "val" if out.endswith("val") else "train")
        assert out in err and split_dir in err and "inside" in err, err
        assert "remove" not in err and "delete" not in err, err
        assert listing(root) == before  # nothing written: no folder, no lock, no .partial
    # through a symbolic link into the tree: the real path is what counts
    os.symlink(os.path.join(root, "train"), str(tmp_path / "link"))
    rc, err = cli([root, str(tmp_path / "link" / "out"), "--splits", "train"])
    assert rc == 2 and "inside" in err, err
    # --tmp inside the tree is refused too, before the output folder is made
    out = str(tmp_path / "out")
    rc, err = cli([root, out, "--tmp", os.path.join(root, "val"), "--splits", "train"])
    assert rc == 2 and "--tmp" in err and os.path.join(root, "val") in err, err
    assert not os.path.exists(out) and listing(root) == before


def test_output_left_inside_the_tree_is_moved_out_and_resumed(tree, clean, tmp_path):
    """A conversion stopped (kill -9 in the merge) in a folder that then sits in the tree (as
    an older version allowed): --resume there is refused with a `mv` that keeps everything;
    following it, --resume finishes with the clean records."""
    root = str(tmp_path / "S")
    shutil.copytree(tree, root)
    first = str(tmp_path / "first")
    marker = str(tmp_path / "killed")
    p = subprocess.run([sys.executable, "-c", _code(_stop_at("merge", 10, marker, "SIGKILL")),
                        root, first, "--splits", "train", "--workers", "0", "--no-progress"],
                       cwd=REPO, capture_output=True, timeout=TIMEOUT)
    assert p.returncode == -signal.SIGKILL, p.stderr
    inside = os.path.join(root, "train", "zz_out")
    os.rename(first, inside)
    rc, err = cli([root, inside, "--splits", "train", "--resume", "--workers", "0"])
    assert rc == 2 and inside in err and os.path.join(root, "train") in err, err
    assert "remove" not in err and "delete" not in err, err
    assert "ILSVRC-train.lmdb.partial" in err  # what it holds is named, to be kept
    mv = err[err.index("`mv ") + 1:]
    mv = mv[:mv.index("`")]
    subprocess.run(shlex.split(mv), check=True)  # the advice, as given
    new = shlex.split(mv)[-1]
    assert not os.path.exists(inside)
    rc, err = cli([root, new, "--splits", "train", "--resume", "--workers", "0"])
    assert rc == 0, err
    assert records(new) == clean[1]


# ---------------------------------------------------------------- 4. two conversions, one folder

@pytest.mark.parametrize("stage", ["read", "merge"])
def test_second_conversion_is_refused_while_the_first_runs(stage, tree, clean, tmp_path):
    out = str(tmp_path / "out")
    marker = str(tmp_path / "paused")
    first = subprocess.Popen(
        [sys.executable, "-c", _code(_stop_at(stage, 10, marker, "SIGSTOP")), tree, out,
         "--splits", "train", "--workers", "2" if stage == "read" else "0", "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(marker, first, stopped=True)
        partial = os.path.join(out, "ILSVRC-train.lmdb.partial")
        ino = os.stat(partial).st_ino
        os.symlink(out, str(tmp_path / "same"))  # the same folder by another name
        for extra, dst in ((["--overwrite"], out), (["--resume"], out), ([], out),
                           (["--overwrite"], str(tmp_path / "same"))):
            rc, err = cli([tree, dst, "--splits", "train", "--workers", "0", *extra])
            assert rc == 1, err
            assert f"PID {first.pid}" in err and "another conversion" in err, err
            assert "--overwrite" not in err, err  # never the advice that destroyed output
            assert os.stat(partial).st_ino == ino  # untouched
        # the Loader says the unfinished file is being written now, by whom
        with pytest.raises(FileNotFoundError) as e:
            Loader(out, "train")
        assert "unfinished conversion" in str(e.value) and f"PID {first.pid}" in str(e.value)
        assert "wait" in str(e.value)
        with pytest.raises(ValueError, match=rf"unfinished conversion: a conversion is writing "
                                             rf"it now \(PID {first.pid}"):
            SplitReader(partial, "train")  # the .partial passed itself
    finally:
        os.kill(first.pid, signal.SIGCONT)
        try:
            _, err = first.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            first.kill()
            pytest.fail("the first conversion hung after SIGCONT")
    assert first.returncode == 0, err.decode(errors="replace")
    assert records(out) == clean[1]  # the first finished with every record, in order
    assert not os.path.exists(os.path.join(out, ".convert.lock"))  # removed at the end
    # afterwards a plain run meets a finished file, as usual
    rc, err = cli([tree, out, "--splits", "train", "--workers", "0"])
    assert rc == 1 and "already exists" in err, err


@pytest.mark.parametrize("stage", ["read", "merge"])
def test_after_kill9_messages_say_resume_is_safe(stage, tree, clean, tmp_path):
    """Killed (its workers too, in pass 1): the lock is gone with it, the Loader and the
    converter say no conversion is running and --resume is safe; it ends with clean records."""
    out = str(tmp_path / "out")
    marker = str(tmp_path / "killed")
    p = subprocess.run([sys.executable, "-c", _code(_stop_at(stage, 10, marker, "SIGKILL")),
                        tree, out, "--splits", "train", "--workers",
                        "2" if stage == "read" else "0", "--no-progress"],
                       cwd=REPO, capture_output=True, timeout=TIMEOUT)
    assert p.returncode == -signal.SIGKILL, p.stderr
    with pytest.raises(FileNotFoundError) as e:
        Loader(out, "train")
    assert "unfinished conversion" in str(e.value) and "no conversion is running" in str(e.value)
    assert "--resume is safe" in str(e.value)
    with pytest.raises(ValueError, match="unfinished conversion: no conversion is running"):
        SplitReader(os.path.join(out, "ILSVRC-train.lmdb.partial"), "train")
    rc, err = cli([tree, out, "--splits", "train", "--workers", "0"])
    assert rc == 1 and "unfinished conversion" in err and "no conversion is running" in err, err
    assert "--resume" in err
    rc, err = cli([tree, out, "--splits", "train", "--workers", "0", "--resume"])
    assert rc == 0, err
    assert records(out) == clean[1]
    assert not os.path.exists(os.path.join(out, ".convert.lock"))


def test_a_forked_child_never_keeps_a_dead_conversions_lock(tmp_path):
    """The converter's workers are forked: a child that outlives its killed parent must not
    keep the folder locked (children close their copy at fork)."""
    from imagenet_seq.format.convlock import ConversionLock, holder

    folder = str(tmp_path / "out")
    code = f"""
import os, signal, sys, time
from imagenet_seq.format.convlock import ConversionLock
ConversionLock({folder!r}).acquire()
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)  # let the test's pipe close: run() returns while this child lives
    os.dup2(null, 2)
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == -signal.SIGKILL, p.stderr
    child = int(p.stdout.split()[0])
    try:
        assert os.path.exists(f"/proc/{child}")  # the child lives on
        assert os.path.exists(os.path.join(folder, ".convert.lock"))  # left by the kill
        assert holder(folder) is None  # but nobody holds it
        with ConversionLock(folder):
            assert holder(folder)["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)
    assert not os.path.exists(os.path.join(folder, ".convert.lock"))


def test_a_bad_input_leaves_no_output_folder(tmp_path):
    out = str(tmp_path / "out")
    rc, err = cli([str(tmp_path / "missing"), out, "--workers", "0"])
    assert rc == 2 and "does not exist" in err, err
    assert not os.path.exists(out)


def test_a_replaced_partial_is_never_reported_as_done(tree, tmp_path):
    """Where no lock protects (a filesystem without flock), a .partial swapped under a running
    conversion makes it fail, not print its count over a file it did not write."""
    out = str(tmp_path / "out")
    prelude = SMALL + f"""
import os
_real = cp.merge
def _swap(*a, _real=_real, **k):
    p = os.path.join({out!r}, "ILSVRC-train.lmdb.partial")
    os.rename(p, p + ".moved")
    open(p, "wb").close()
    yield from _real(*a, **k)
cp.merge = _swap
"""
    rc, err = cli([tree, out, "--splits", "train", "--workers", "0"], prelude=prelude)
    assert rc == 1 and "was replaced by another process" in err, err
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb"))


# ---------------------------------------------------------------- 5. a folder named like a split

def _subdir_lmdb(path, copy_of=None):
    """An LMDB environment folder at ``path`` (lmdb.open's default subdir=True): arbitrary
    keys, or ``copy_of`` (a split file) as its data.mdb."""
    os.makedirs(path)
    if copy_of is not None:
        shutil.copy(copy_of, os.path.join(path, "data.mdb"))
        return
    env = lmdb.open(path, map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"00000000", b"someone else's record")
    env.close()


def _assert_folder_message(text, path):
    assert path in text and "is a folder" in text, text
    assert "LMDB environment directory" in text and "preprocess_sequential.py" in text, text


def test_folder_named_like_a_split(tree, clean, tmp_path):
    root = str(tmp_path / "lmdb")
    path = os.path.join(root, "ILSVRC-train.lmdb")
    _subdir_lmdb(path)
    for where in (root, path):  # the folder holding it, or the "file" itself
        with pytest.raises(FileNotFoundError) as e:
            fmt.find_split(where, "train")
        _assert_folder_message(str(e.value), path)
        with pytest.raises(FileNotFoundError) as e:
            Loader(where, "train")
        _assert_folder_message(str(e.value), path)
        p = subprocess.run([sys.executable, "-m", "imagenet_seq.tools.verify_cli", where,
                            "--no-progress"], cwd=REPO, capture_output=True, text=True,
                           timeout=TIMEOUT)
        assert p.returncode == 1 and "Traceback" not in p.stderr + p.stdout, p.stderr
        _assert_folder_message(p.stdout, path)
        assert "Damaged records" not in p.stdout  # not a damaged file: a folder
    # the converter refuses to write over it, before writing anything
    rc, err = cli([tree, root, "--splits", "train", "--workers", "0"])
    assert rc == 2 and path in err and "LMDB environment directory" in err, err
    assert f"mv {path} {path}.dir" in err and "delete" not in err.replace("nothing is deleted", "")
    assert sorted(os.listdir(root)) == ["ILSVRC-train.lmdb"]


def test_folder_holding_a_split_file_says_how_to_put_it_in_place(clean, tmp_path):
    root = str(tmp_path / "lmdb")
    path = os.path.join(root, "ILSVRC-train.lmdb")
    _subdir_lmdb(path, copy_of=os.path.join(clean[0], "ILSVRC-train.lmdb"))
    with pytest.raises(FileNotFoundError) as e:
        Loader(root, "train")
    text = str(e.value)
    _assert_folder_message(text, path)
    assert "imagenet_seq train split" in text, text
    cmd = text[text.index("`mv ") + 1:]
    cmd = cmd[:cmd.index("`")]
    subprocess.run(cmd, shell=True, check=True)  # the advice, as given
    assert records(root) == clean[1]


# ---------------------------------------------------------------- messages

def test_output_that_is_a_file_is_called_a_file(tree, tmp_path):
    out = tmp_path / "out"
    out.write_bytes(b"mine")
    for dst in (str(out), str(out / "sub")):
        rc, err = cli([tree, dst, "--splits", "train", "--workers", "0"])
        assert rc == 2 and str(out) in err, err
        assert "is a regular file" in err or f"{out} is a file" in err, err
        assert "File exists" not in err and "--resume" not in err and "free space" not in err
    assert out.read_bytes() == b"mine"


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")


def test_full_disk_in_the_merge_says_so_then_resume(tree, clean, tmp_path):
    """The output on a real tmpfs that holds the runs' estimate but not the LMDB file (its
    pages): the merge fails; the message says the disk is full and names the folder; after
    room is made, --resume ends with the clean records."""
    final = os.path.getsize(os.path.join(clean[0], "ILSVRC-train.lmdb"))
    src = sum(os.path.getsize(os.path.join(d, f))
              for d, _, fs in os.walk(os.path.join(tree, "train")) for f in fs)
    assert final > 1.5 * src  # 4 KB pages around ~2 KB images: the estimate passes, the file not
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, (src + final) // 2)
    try:
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        out = str(mnt / "out")
        rc, err = cli([tree, out, "--splits", "train", "--workers", "0", "--tmp", str(scratch)],
                      prelude=SMALL)
        assert rc == 1, err
        assert f"the disk holding {out} is full" in err and "--resume" in err, err
        assert not err.rstrip().endswith("Input/output error"), err
        # LMDB reports a write cut short by the full disk as EIO, not ENOSPC: the same cause
        said = write_failure(lmdb.Error("mdb_txn_commit: Input/output error"), out)
        assert said.startswith(f"the disk holding {out} is full"), said
        assert "--resume" in said
        subprocess.run(["mount", "-o", f"remount,size={final * 4}", str(mnt)], check=True)
        rc, err = cli([tree, out, "--splits", "train", "--workers", "0", "--tmp",
                       str(scratch), "--resume"])
        assert rc == 0, err
        assert records(out) == clean[1]
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_output_disk_checked_first_when_tmp_is_elsewhere(tree, tmp_path):
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, 16 << 10)
    try:
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        out = str(mnt / "out")
        rc, err = cli([tree, out, "--splits", "train", "--workers", "0", "--tmp", str(scratch)])
        assert rc == 1 and "too little space for the output" in err and out in err, err
        assert os.listdir(scratch) == [] or all(
            not os.listdir(os.path.join(scratch, d)) for d in os.listdir(scratch))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
