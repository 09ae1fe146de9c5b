"""Fault injection, converter half: hostile trees, write faults, kills, signals, truncation.

Every case ends in one of three outcomes, checked here: ``stored`` (the output equals a clean
conversion record by record, or holds exactly the expected records), ``error`` (non-zero exit,
a message naming the file or folder and the way out, and a ``--resume``/fix that then ends in
``stored``), or ``skipped`` (the file is listed with its reason in the report). Never a signal,
a traceback, a hang (every converter run is a subprocess under a timeout) or a wrong answer.
``test_zz_fault_summary`` prints the count of cases per outcome.

Write faults come from a small LD_PRELOAD shim (``write``/``pwrite``/``writev``/``fsync`` on
the ``.partial`` fail with ENOSPC or EIO, or the process SIGKILLs itself, after N bytes): it
needs no root and hits LMDB's own C writes. A real full tmpfs is used too where mounting works.
"""
import collections
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from imagenet_seq import format as fmt
from imagenet_seq.convert.cli import main
from imagenet_seq.tools.sample import make_sample_imagefolder
from run_faults import KILL_IN_MERGE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 60  # far above any case here (~1 s each): reaching it means a hang
OUTCOMES = collections.OrderedDict()  # case -> 'stored' | 'error' | 'skipped'
# small commits and small sorted runs: a 31-image split is cut into many runs and commits, so
# faults land in pass 1 (reading into runs) as well as pass 2 (merging into the LMDB)
SMALL_COMMITS = "import imagenet_seq.convert.passes as w; w.COMMIT_RECORDS = 4; w.RUN_RECORDS = 7\n"

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
static long long limit = -1, total = 0;
static int err = 0, kill_mode = 0, tripped = 0;
static const char *substr;
__attribute__((constructor)) static void init(void) {
  const char *s = getenv("FAULT_AFTER_BYTES"); if (s) limit = atoll(s);
  s = getenv("FAULT_ERRNO"); if (s) err = atoi(s);
  kill_mode = getenv("FAULT_KILL") != NULL; substr = getenv("FAULT_PATH");
}
static int fault(int fd, size_t n) {
  char link[64], path[4096];
  if (limit < 0 || !substr) return 0;
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t len = readlink(link, path, sizeof path - 1);
  if (len <= 0) return 0;
  path[len] = 0;
  if (!strstr(path, substr)) return 0;
  if (!tripped && total + (long long)n <= limit) { total += n; return 0; }
  tripped = 1;  /* a full or failing disk stays so */
  if (kill_mode) raise(SIGKILL);
  errno = err; return 1;
}
static size_t iolen(const struct iovec *v, int c) {
  size_t n = 0; for (int i = 0; i < c; i++) n += v[i].iov_len; return n;
}
#define REAL(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)
ssize_t write(int fd, const void *b, size_t n) {
  REAL(write); if (fault(fd, n)) return -1; return real(fd, b, n); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) {
  REAL(pwrite); if (fault(fd, n)) return -1; return real(fd, b, n, o); }
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) {
  REAL(pwrite64); if (fault(fd, n)) return -1; return real(fd, b, n, o); }
ssize_t writev(int fd, const struct iovec *v, int c) {
  REAL(writev); if (fault(fd, iolen(v, c))) return -1; return real(fd, v, c); }
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t o) {
  REAL(pwritev); if (fault(fd, iolen(v, c))) return -1; return real(fd, v, c, o); }
ssize_t pwritev64(int fd, const struct iovec *v, int c, off_t o) {
  REAL(pwritev64); if (fault(fd, iolen(v, c))) return -1; return real(fd, v, c, o); }
int fdatasync(int fd) { REAL(fdatasync); if (fault(fd, 0)) return -1; return real(fd); }
int fsync(int fd) { REAL(fsync); if (fault(fd, 0)) return -1; return real(fd); }
__attribute__((destructor)) static void fini(void) {
  const char *r = getenv("FAULT_REPORT"); FILE *f;
  if (r && (f = fopen(r, "w"))) { fprintf(f, "%lld\n", total); fclose(f); }
}
"""


# ---------------------------------------------------------------- helpers

def record(case, outcome):
    assert outcome in ("stored", "error", "skipped")
    OUTCOMES[case] = outcome


def cli(args, prelude="", env=None, expect_signal=None, **popen):
    """Run the converter CLI in a subprocess under a timeout; (returncode, stderr text)."""
    code = "import sys\n" + prelude + ("from imagenet_seq.convert.cli import main\n"
                                       "sys.exit(main(sys.argv[1:]))\n")
    try:
        p = subprocess.run([sys.executable, "-c", code, *args, "--no-progress"], cwd=REPO,
                           capture_output=True, timeout=TIMEOUT,
                           env=dict(os.environ, **(env or {})), **popen)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang: converter {args} still running after {TIMEOUT} s")
    err = p.stderr.decode("utf-8", "backslashreplace")
    if expect_signal is None:
        assert p.returncode >= 0, f"converter died of signal {-p.returncode}: {err}"
        assert "Traceback" not in err, err
    else:
        assert p.returncode == -expect_signal, (p.returncode, err)
    return p.returncode, err


def contents(out, split="train"):
    """Everything a conversion decides: records in order, labels, metadata, skip records."""
    from imagenet_seq.read.reader import SplitReader
    from imagenet_seq.convert.writer import _committed_skips

    r = SplitReader(out, split)
    try:
        recs = [(bytes(j), lab) for _, j, lab in r.read_all()]
        labels = [int(x) for x in r.labels]
        meta = {k: getattr(r.meta, k) for k in ("classes", "class_counts", "num_records",
                                                 "total_bytes", "skipped", "options")}
    finally:
        r.close()
    env = fmt.open_env(os.path.join(out, fmt.split_filename(split)))
    skips = list(_committed_skips(env))
    env.close()
    return {"records": recs, "labels": labels, "meta": meta, "skips": skips}


def assert_same(out, ref):
    got = contents(out)
    assert got["meta"] == ref["meta"]
    assert got["labels"] == ref["labels"]
    assert got["skips"] == ref["skips"]
    assert got["records"] == ref["records"]  # record by record, order included
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb.partial"))


def report(out):
    path = os.path.join(out, "ILSVRC-train.report.tsv")
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return dict(rows)


def resume(root, out, workers="0"):
    assert main([root, out, "--splits", "train", "--resume", "--workers", workers,
                 "--no-progress"]) == 0


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 10 small JPEGs, one empty .JPEG (a skip inside the plan), one .txt."""
    root = str(tmp_path_factory.mktemp("faults") / "in")
    classes = make_sample_imagefolder(root, train_per_class=10, val_per_class=1, num_classes=3,
                                      size=(96, 72))
    open(os.path.join(root, "train", classes[1], "empty.JPEG"), "wb").close()
    with open(os.path.join(root, "train", classes[2], "notes.txt"), "w") as f:
        f.write("not an image\n")
    return root, classes


@pytest.fixture(scope="module")
def clean(tree, tmp_path_factory):
    root, _ = tree
    out = str(tmp_path_factory.mktemp("clean") / "out")
    assert main([root, out, "--splits", "train", "--workers", "0", "--no-progress"]) == 0
    return out, contents(out)


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: the write-fault shim cannot be built")
    d = tmp_path_factory.mktemp("shim")
    (d / "fault.c").write_text(SHIM_C)
    r = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "fault.so"),
                        str(d / "fault.c"), "-ldl"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"the write-fault shim does not build here: {r.stderr[-300:]}")
    return str(d / "fault.so")


def bytes_written(tree, shim, d, fault_path: str) -> int:
    """Bytes a clean conversion (small commits and runs) writes to files whose path contains
    ``fault_path``, counted by the shim: the scale of the fault points."""
    total = str(d / "total")
    rc, err = cli([tree[0], str(d / "out"), "--splits", "train", "--workers", "2"],
                  prelude=SMALL_COMMITS,
                  env={"LD_PRELOAD": shim, "FAULT_PATH": fault_path,
                       "FAULT_AFTER_BYTES": str(1 << 50), "FAULT_REPORT": total})
    assert rc == 0, err
    return int(open(total).read())


@pytest.fixture(scope="module")
def written(tree, shim, tmp_path_factory):
    """Bytes a conversion (4-record commits) writes to its .partial: the fault points' scale."""
    n = bytes_written(tree, shim, tmp_path_factory.mktemp("count"), ".partial")
    assert n > 100_000
    return n


def copy_tree(tree, tmp_path):
    root = str(tmp_path / "in")
    shutil.copytree(tree[0], root, symlinks=True)
    return root, tree[1]


# ---------------------------------------------------------------- hostile trees

def _hostile(kind, d, cls_dir):
    """Make one hostile entry in class folder ``cls_dir``; (relative name, reason part)."""
    if kind == "fifo":
        os.mkfifo(os.path.join(cls_dir, "fifo.JPEG"))
        return "fifo.JPEG", "FIFO"
    if kind == "socket":
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(cls_dir, "sock.JPEG"))
        s.close()
        return "sock.JPEG", "socket"
    if kind == "device":
        os.mknod(os.path.join(cls_dir, "null.JPEG"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        return "null.JPEG", "character device"
    if kind == "link_loop":
        os.symlink("loop_b.JPEG", os.path.join(cls_dir, "loop_a.JPEG"))
        os.symlink("loop_a.JPEG", os.path.join(cls_dir, "loop_b.JPEG"))
        return "loop_a.JPEG", "symbolic link loop"
    if kind == "folder_loop":
        os.makedirs(os.path.join(cls_dir, "sub"))
        os.symlink("..", os.path.join(cls_dir, "sub", "up"))
        return os.path.join("sub", "up"), "symbolic link loop"
    if kind == "dangling":
        os.symlink(os.path.join(d, "gone.JPEG"), os.path.join(cls_dir, "dangling.JPEG"))
        return "dangling.JPEG", "dangling symbolic link"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, workers", [
    ("fifo", "0"), ("fifo", "2"), ("socket", "0"), ("device", "2"), ("link_loop", "2"),
    ("folder_loop", "0"), ("folder_loop", "2"), ("dangling", "2")])
def test_not_a_file_is_reported_never_opened(kind, workers, tree, clean, tmp_path):
    """Scan-time skips leave the plan alone: the output equals the clean run's, in order."""
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    root, classes = copy_tree(tree, tmp_path)
    name, why = _hostile(kind, str(tmp_path), os.path.join(root, "train", classes[0]))
    out = str(tmp_path / "out")
    rc, err = cli([root, out, "--splits", "train", "--workers", workers])
    assert rc == 0, err
    assert why in report(out)[os.path.join(classes[0], name)]
    assert_same(out, clean[1])
    record(f"{kind} (workers {workers})", "skipped")


def test_non_utf8_names_are_stored(tree, clean, tmp_path):
    """A file and a class folder whose names are not UTF-8: stored under the names
    os.listdir gives (what torchvision's ImageFolder lists), reported names keep their bytes."""
    root, classes = copy_tree(tree, tmp_path)
    src = os.path.join(root, "train", classes[0], sorted(os.listdir(
        os.path.join(root, "train", classes[0])))[0])
    odd_file = os.fsdecode(b"caf\xe9.JPEG")
    odd_class = os.fsdecode(b"n99_\xff\xfe")
    shutil.copy(src, os.path.join(root, "train", classes[0], odd_file))
    os.makedirs(os.path.join(root, "train", odd_class))
    shutil.copy(src, os.path.join(root, "train", odd_class, "a.JPEG"))
    with open(os.path.join(root, "train", odd_class, os.fsdecode(b"x\xfd.txt")), "w") as f:
        f.write("x")
    out = str(tmp_path / "out")
    rc, err = cli([root, out, "--splits", "train", "--workers", "2", "--json"])
    assert rc == 0, err
    got = contents(out)
    listed = sorted(e.name for e in os.scandir(os.path.join(root, "train")) if e.is_dir())
    assert got["meta"]["classes"] == listed and odd_class in listed
    assert got["meta"]["num_records"] == clean[1]["meta"]["num_records"] + 2
    jpeg = open(src, "rb").read()
    assert (jpeg, 0) in got["records"] and (jpeg, listed.index(odd_class)) in got["records"]
    assert os.path.join(odd_class, os.fsdecode(b"x\xfd.txt")) in report(out)
    raw = open(os.path.join(out, "ILSVRC-train.report.tsv"), "rb").read()
    assert b"n99_\xff\xfe/x\xfd.txt" in raw  # the bytes on disk, usable by rm
    record("non-UTF-8 file name", "stored")
    record("non-UTF-8 class folder", "stored")


def _png_header_only(width, height):
    """A PNG that declares width x height (PIL checks the size at open, before decoding)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _jpeg_declaring(src_jpeg, width, height):
    """A copy of a JPEG whose frame header declares width x height."""
    from imagenet_seq.format.jpeg import segments

    data = bytearray(src_jpeg)
    for marker, start, _ in segments(bytes(data)):
        if marker in (0xC0, 0xC2):
            data[start + 5:start + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("kind", ["zero_byte", "huge_png", "huge_jpeg", "truncated"])
def test_undecodable_files_are_reported(kind, tree, clean, tmp_path):
    root, classes = copy_tree(tree, tmp_path)
    d = os.path.join(root, "train", classes[0])
    src = open(os.path.join(d, sorted(os.listdir(d))[0]), "rb").read()
    name = {"zero_byte": "zero.JPEG", "huge_png": "huge.png", "huge_jpeg": "huge.JPEG",
            "truncated": "cut.JPEG"}[kind]
    data = {"zero_byte": b"", "huge_png": _png_header_only(14000, 14000),
            "huge_jpeg": _jpeg_declaring(src, 14000, 14000),
            "truncated": src[:len(src) // 2]}[kind]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    out = str(tmp_path / "out")
    rc, err = cli([root, out, "--splits", "train", "--workers", "2"])
    assert rc == 0, err
    reason = report(out)[os.path.join(classes[0], name)]
    assert {"zero_byte": "empty", "huge_png": "exceeds limit", "huge_jpeg": "PIL's limit",
            "truncated": "truncated"}[kind] in reason, reason
    got = contents(out)
    assert sorted(got["records"]) == sorted(clean[1]["records"])  # the plan differs: as sets
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb.partial"))
    record(f"{kind.replace('_', ' ')} image", "skipped")


def test_large_image_memory_is_about_two_copies(tmp_path):
    """README: a converted (non-JPEG) image costs a worker ~6-7 bytes per pixel at peak."""
    code = r"""
import io, resource, sys
import numpy as np
from PIL import Image
from imagenet_seq.convert.images import normalise
im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), np.uint8))
buf = io.BytesIO(); im.save(buf, "PNG", compress_level=1); data = buf.getvalue(); del im, buf
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out, note = normalise(data)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print((peak - base) / (3000 * 4000))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=REPO)
    assert r.returncode == 0, r.stderr
    per_pixel = float(r.stdout.split()[-1])
    assert per_pixel < 8.5, per_pixel  # the old path held ~4 copies (12+ bytes per pixel)
    record(f"12 Mpixel PNG: {per_pixel:.1f} bytes/pixel", "stored")


# ---------------------------------------------------------------- unreadable files

READ_FAULT = """
import errno, os, imagenet_seq.convert.source_reader as cw
_real = cw.read_source
def _failing(path, _real=_real):
    if path.endswith({name!r}):
        raise OSError(errno.{code}, os.strerror(errno.{code}), path)
    return _real(path)
cw.read_source = _failing
"""


@pytest.mark.parametrize("code", ["EACCES", "EIO"])
def test_unreadable_file_stops_naming_it(code, tree, clean, tmp_path):
    """A regular file that cannot be read (root ignores chmod 000, so the read is patched)
    stops the run naming it: a permissions problem or a failing disk is fixed, not skipped."""
    root, classes = copy_tree(tree, tmp_path)
    name = os.path.join(classes[2], sorted(os.listdir(os.path.join(root, "train",
                                                                   classes[2])))[3])
    out = str(tmp_path / "out")
    rc, err = cli([root, out, "--splits", "train", "--workers", "2"],
                  prelude=READ_FAULT.format(name=name, code=code))
    assert rc == 1 and name in err and "cannot read" in err and "--resume" in err, err
    resume(root, out)
    assert_same(out, clean[1])
    record(f"unreadable file ({code})", "error")


def test_unreadable_file_chmod(tree, clean, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root's reads (the patched "
                    "EACCES case covers the path)")
    root, classes = copy_tree(tree, tmp_path)
    d = os.path.join(root, "train", classes[2])
    path = os.path.join(d, sorted(os.listdir(d))[3])
    os.chmod(path, 0)
    out = str(tmp_path / "out")
    rc, err = cli([root, out, "--splits", "train", "--workers", "2"])
    assert rc == 1 and os.path.basename(path) in err and "--resume" in err, err
    os.chmod(path, 0o644)
    resume(root, out)
    assert_same(out, clean[1])
    record("unreadable file (chmod 000)", "error")


def test_unlistable_folder_stops_naming_it(tree, tmp_path):
    """A sub-folder that cannot be listed (patched: root lists anything) stops the scan."""
    root, classes = copy_tree(tree, tmp_path)
    sub = os.path.join(root, "train", classes[0], "sub")
    os.makedirs(sub)
    prelude = f"""
import errno, os
_real = os.scandir
def _sd(p=".", _real=_real):
    if os.fspath(p) == {sub!r}:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)
    return _real(p)
os.scandir = _sd
"""
    rc, err = cli([root, str(tmp_path / "out"), "--splits", "train"], prelude=prelude)
    assert rc == 2 and sub in err and "permissions" in err, err
    record("unlistable sub-folder (EACCES)", "error")


# ---------------------------------------------------------------- write faults

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("at", [0.0, 0.5, 0.97])
def test_write_fault_then_resume(code, at, tree, clean, shim, written, tmp_path):
    """ENOSPC / EIO in LMDB's writes: exit 1 naming the folder and --resume, within the
    timeout whatever the workers do; the resume equals a clean run."""
    root, _ = tree
    out = str(tmp_path / "out")
    rc, err = cli([root, out, "--splits", "train", "--workers", "2"], prelude=SMALL_COMMITS,
                  env={"LD_PRELOAD": shim, "FAULT_PATH": ".partial",
                       "FAULT_AFTER_BYTES": str(int(written * at)), "FAULT_ERRNO": str(code)})
    assert rc == 1, err
    assert out in err and "--resume" in err and os.strerror(code) in err, err
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb"))
    resume(root, out)
    assert_same(out, clean[1])
    record(f"{errno.errorcode[code]} at {at:.0%} of the writes", "error")


def test_real_full_tmpfs_then_resume(tree, clean, tmp_path):
    root, _ = tree
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    need = os.path.getsize(os.path.join(clean[0], "ILSVRC-train.lmdb"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need // 3}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the shim cases cover "
                    "ENOSPC")
    try:
        out = str(mnt / "out")
        rc, err = cli([root, out, "--splits", "train", "--workers", "2"], prelude=SMALL_COMMITS)
        # LMDB reports the short write of a full tmpfs as EIO: the advice names both causes
        assert rc == 1 and "free space" in err and "--resume" in err, err
        subprocess.run(["mount", "-o", f"remount,size={need * 4}", str(mnt)], check=True)
        resume(root, out)
        assert_same(out, clean[1])
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
    record("ENOSPC on a real full tmpfs", "error")


# ---------------------------------------------------------------- kills, signals

@pytest.mark.parametrize("at", [0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 0.999])
def test_kill9_then_resume_is_identical(at, tree, clean, shim, written, tmp_path):
    """SIGKILL at a write (mid-transaction, at a commit, in the final transaction)."""
    root, _ = tree
    out = str(tmp_path / "out")
    cli([root, out, "--splits", "train", "--workers", "2"], prelude=SMALL_COMMITS,
        env={"LD_PRELOAD": shim, "FAULT_PATH": ".partial", "FAULT_KILL": "1",
             "FAULT_AFTER_BYTES": str(int(written * at))}, expect_signal=signal.SIGKILL)
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb"))
    resume(root, out, workers="2")
    assert_same(out, clean[1])
    record(f"kill -9 at {at:.1%} of the writes", "stored")


@pytest.fixture(scope="module")
def written_runs(tree, shim, tmp_path_factory):
    """Bytes pass 1 writes to its temporary sorted runs (7-record runs)."""
    n = bytes_written(tree, shim, tmp_path_factory.mktemp("count_runs"), ".partial.runs/")
    assert n > 50_000  # 30 images of ~3 KB, in 5 runs
    return n


@pytest.mark.parametrize("at", [0.0, 0.3, 0.55, 0.999])
def test_kill9_in_the_read_pass_then_resume_is_identical(at, tree, clean, shim, written_runs,
                                                         tmp_path):
    """SIGKILL while pass 1 writes a sorted run (or fsyncs it): the unlisted run is deleted on
    resume, its images read again; the result equals a clean run record by record."""
    root, _ = tree
    out = str(tmp_path / "out")
    cli([root, out, "--splits", "train", "--workers", "2"], prelude=SMALL_COMMITS,
        env={"LD_PRELOAD": shim, "FAULT_PATH": ".partial.runs/", "FAULT_KILL": "1",
             "FAULT_AFTER_BYTES": str(int(written_runs * at))}, expect_signal=signal.SIGKILL)
    assert os.path.isdir(os.path.join(out, "ILSVRC-train.lmdb.partial.runs"))
    resume(root, out, workers="2")
    assert_same(out, clean[1])
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb.partial.runs"))
    record(f"kill -9 at {at:.1%} of the sorted runs' writes", "stored")


@pytest.mark.parametrize("at", [0, 9, 17, 29])
def test_kill9_in_the_merge_pass_then_resume_is_identical(at, tree, clean, tmp_path):
    """SIGKILL while pass 2 merges the runs into the LMDB (after ``at`` records): the resume
    continues from the per-run offsets of the last commit, record by record as a clean run."""
    root, _ = tree
    out = str(tmp_path / "out")
    prelude = SMALL_COMMITS + KILL_IN_MERGE.format(at=at)
    cli([root, out, "--splits", "train", "--workers", "2"], prelude=prelude,
        expect_signal=signal.SIGKILL)
    resume(root, out, workers="2")
    assert_same(out, clean[1])
    record(f"kill -9 after {at} records of the merge", "stored")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_run_write_fault_then_resume(code, tree, clean, shim, written_runs, tmp_path):
    """A full or failing temporary disk: exit 1 naming the run file and --tmp / --resume."""
    root, _ = tree
    out = str(tmp_path / "out")
    rc, err = cli([root, out, "--splits", "train", "--workers", "2"], prelude=SMALL_COMMITS,
                  env={"LD_PRELOAD": shim, "FAULT_PATH": ".partial.runs/",
                       "FAULT_AFTER_BYTES": str(written_runs // 2), "FAULT_ERRNO": str(code)})
    assert rc == 1, err
    assert "temporary run" in err and "--tmp" in err and "--resume" in err, err
    assert os.strerror(code) in err, err
    resume(root, out)
    assert_same(out, clean[1])
    record(f"{errno.errorcode[code]} writing a sorted run", "error")


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill9_at_the_rename_then_resume(when, tree, clean, tmp_path):
    root, _ = tree
    out = str(tmp_path / "out")
    kill = "os.kill(os.getpid(), signal.SIGKILL)"
    prelude = ("import os, signal\n_replace = os.replace\n"
               f"def _r(a, b):\n    {kill if when == 'before' else '_replace(a, b)'}\n"
               f"    {'_replace(a, b)' if when == 'before' else kill}\n"
               "os.replace = _r\n")
    cli([root, out, "--splits", "train", "--workers", "0"], prelude=prelude,
        expect_signal=signal.SIGKILL)
    resume(root, out)
    assert_same(out, clean[1])
    record(f"kill -9 {when} the rename", "stored")


SLOW_WORKERS = SMALL_COMMITS + """
import time, imagenet_seq.convert.workers as cw
_real = cw.normalise
def _slow(*a, _real=_real, **k):
    time.sleep(0.1)  # per image: the whole conversion takes ~3 s, the signal comes at ~0.3 s
    return _real(*a, **k)
cw.normalise = _slow
"""


@pytest.mark.parametrize("how", ["SIGTERM", "SIGTERM to the group", "SIGINT",
                                 "SIGINT to the group"])
def test_signal_stops_cleanly_then_resume(how, tree, clean, tmp_path):
    """SIGTERM behaves as Ctrl-C (SIGINT to the group): the resume hint, 128 + signal, no
    worker traceback; the committed part is kept and --resume ends as a clean run."""
    root, _ = tree
    out = str(tmp_path / "out")
    code = "import sys\n" + SLOW_WORKERS + ("from imagenet_seq.convert.cli import main\n"
                                            "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.Popen([sys.executable, "-c", code, root, out, "--splits", "train",
                          "--workers", "2", "--no-progress"], cwd=REPO,
                         stderr=subprocess.PIPE, start_new_session=True)
    partial = os.path.join(out, "ILSVRC-train.lmdb.partial")
    deadline = time.time() + TIMEOUT
    while not os.path.exists(partial) and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # a chunk or two in flight
    sig = signal.SIGINT if "SIGINT" in how else signal.SIGTERM
    if "group" in how:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"hang after {how}")
    err = err.decode("utf-8", "backslashreplace")
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert "--resume" in err and "Traceback" not in err and "BrokenPipe" not in err, err
    resume(root, out)
    assert_same(out, clean[1])
    record(f"{how} mid-conversion", "error")


def test_worker_killed_is_an_error_not_a_hang(tree, clean, tmp_path):
    root, classes = tree
    victim = os.path.join(classes[1], sorted(os.listdir(os.path.join(root, "train",
                                                                     classes[1])))[2])
    prelude = SMALL_COMMITS + f"""
import os, signal, imagenet_seq.convert.workers as cw
_real, _main = cw.process_chunk, os.getpid()
def _die(split_dir, items, *a, _real=_real):
    if os.getpid() != _main and any(rel == {victim!r} for rel, *_ in items):
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(split_dir, items, *a)
cw.process_chunk = _die
"""
    out = str(tmp_path / "out")
    rc, err = cli([root, out, "--splits", "train", "--workers", "2"], prelude=prelude)
    assert rc == 1 and "worker died" in err and "--resume" in err, err
    resume(root, out, workers="2")
    assert_same(out, clean[1])
    record("a worker killed (OOM killer)", "error")


@pytest.mark.parametrize("seed", ["0", "1", "2"])
def test_strict_stops_promptly(seed, tree, tmp_path):
    """--strict with a broken image ends within the timeout (the Pool used to hang here)."""
    root, classes = tree
    rc, err = cli([root, str(tmp_path / "out"), "--splits", "train", "--workers", "2",
                   "--strict", "--seed", seed])
    assert rc == 1 and "empty.JPEG" in err and "--strict" in err, err
    record(f"--strict with a broken image (seed {seed})", "error")


# ---------------------------------------------------------------- truncation, resume

@pytest.fixture(scope="module")
def half_done(tree, shim, written, tmp_path_factory):
    """A .partial of a conversion killed half way."""
    root, _ = tree
    out = str(tmp_path_factory.mktemp("half") / "out")
    cli([root, out, "--splits", "train", "--workers", "0"], prelude=SMALL_COMMITS,
        env={"LD_PRELOAD": shim, "FAULT_PATH": ".partial", "FAULT_KILL": "1",
             "FAULT_AFTER_BYTES": str(written // 2)}, expect_signal=signal.SIGKILL)
    return os.path.join(out, "ILSVRC-train.lmdb.partial")


@pytest.mark.parametrize("keep", [100, 5000, 0.3, 0.9, -1])
def test_truncated_partial_resume_is_a_clear_error(keep, tree, half_done, tmp_path):
    """An interrupted copy of a .partial: --resume names it and the fix, never SIGBUS."""
    root, _ = tree
    out = str(tmp_path / "out")
    os.makedirs(out)
    partial = os.path.join(out, os.path.basename(half_done))
    shutil.copy(half_done, partial)
    size = os.path.getsize(partial)
    n = keep if isinstance(keep, int) and keep > 0 else size - 1 if keep == -1 \
        else int(size * keep)
    os.truncate(partial, n)
    rc, err = cli([root, out, "--splits", "train", "--resume", "--workers", "2"])
    assert rc == 1 and partial in err and "delete" in err, err
    assert "truncated" in err or "shorter than" in err, err  # says what is wrong
    record(f"truncated .partial ({n} of {size} bytes) + --resume", "error")


def test_empty_partial_resumes_from_scratch(tree, clean, tmp_path):
    root, _ = tree
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, "ILSVRC-train.lmdb.partial"), "wb").close()
    rc, err = cli([root, out, "--splits", "train", "--resume", "--workers", "2"])
    assert rc == 0, err
    assert_same(out, clean[1])
    record("zero-byte .partial + --resume", "stored")


def test_resume_over_complete_output(tree, clean, tmp_path, capsys):
    """--resume keeps a finished split and reports all its skipped files, not an empty list."""
    root, _ = tree
    out = str(tmp_path / "out")
    shutil.copytree(clean[0], out)
    os.remove(os.path.join(out, "ILSVRC-train.report.tsv"))
    assert main([root, out, "--splits", "train", "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    rows = report(out)
    assert set(rows) == {os.path.join(tree[1][1], "empty.JPEG"),
                         os.path.join(tree[1][2], "notes.txt")}
    assert f"warning: 2 files skipped (not stored); reasons in {out}" in err, err
    assert_same(out, clean[1])
    # the finished file cut short: named, never SIGBUS
    final = os.path.join(out, "ILSVRC-train.lmdb")
    os.truncate(final, os.path.getsize(final) // 2)
    rc, err = cli([root, out, "--splits", "train", "--resume"])
    assert rc == 1 and final in err and "truncated" in err and "--overwrite" in err, err
    record("--resume over complete output", "stored")
    record("--resume over a truncated complete file", "error")


def test_zz_fault_summary(capsys):
    """Runs last in this file: the count of fault cases and their outcomes."""
    counts = collections.Counter(OUTCOMES.values())
    with capsys.disabled():
        print(f"\nconverter fault cases passed: {len(OUTCOMES)} "
              f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}); a signal, hang, "
              "traceback or wrong output fails its test instead (see the failures above)")
        for case, outcome in OUTCOMES.items():
            print(f"  {outcome:8s} {case}")
    assert set(counts) <= {"stored", "error", "skipped"}
