import faulthandler
import io
import json
import os
import shutil
import signal

import cv2
import numpy as np
import pytest
from PIL import Image

from imagenet_seq.tools.sample import imagenet_like_jpeg, make_sample_imagefolder


# A run started in the background (nohup, `cmd &` in a script) inherits SIGINT ignored, and
# Python then installs no KeyboardInterrupt handler in the programs the tests start: the Ctrl-C
# tests would see a child that ignores Ctrl-C. Restore the default here; a handled signal is
# reset to SIG_DFL at exec, so every child gets Python's own handling again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A slow or hung test fails alone, with every thread's stack in its report: pytest-timeout
# (pytest.ini: timeout, timeout_method = signal) raises in the test's main thread. The old
# watchdog (faulthandler with exit=True) ended the whole run with status 1 and its stacks went
# into pytest's captured stderr, lost with the process: a silent death. The backstop below
# fires only if the signal cannot interrupt the test (a C call that never returns): it writes
# the stacks to the terminal pytest reports to, not to the captured stream, then ends the run.
BACKSTOP_S = float(os.environ.get("IMAGENET_SEQ_TEST_BACKSTOP_S", 300))  # after the timeout


def _terminal(config):
    """A file on the terminal pytest writes to (fd capture points fd 1/2 at temporary files)."""
    try:  # the capture plugin keeps a duplicate of the original fd 1
        fd = config.pluginmanager.getplugin("capturemanager")._global_capturing.out.targetfd_save
        return os.fdopen(os.dup(fd), "w")
    except Exception:  # noqa: BLE001 - -s, another capture method, another pytest
        return open(os.path.join(str(config.rootpath), ".pytest-hang.log"), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else \
        float(item.config.getini("timeout") or 0)
    if limit > 0:
        out = _terminal(item.config)
        out.write("")  # opened now: a stuck process cannot open files later
        faulthandler.dump_traceback_later(limit + BACKSTOP_S, exit=True, file=out)
    yield
    if limit > 0:
        faulthandler.cancel_dump_traceback_later()
        out.close()


def copy_with_format_version(src: str, dst: str, version: int) -> None:
    """Copy an LMDB written by preprocess and stamp another format version into its __meta__."""
    from imagenet_seq import format as fmt

    shutil.copy(src, dst)
    env = fmt.open_env(dst, readonly=False, lock=False)
    with env.begin(write=True) as txn:
        meta = json.loads(bytes(txn.get(fmt.META_KEY)))
        meta["version"] = version
        txn.put(fmt.META_KEY, json.dumps(meta).encode())
    env.close()


def pil_rgb(path_or_bytes):
    """The reference pixels: what torchvision's ImageFolder loader gives."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def cv2_rgb(data: bytes):
    img = cv2.imdecode(np.frombuffer(data, np.uint8),
                       cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if img is None else img[:, :, ::-1]


def add_odd_files(root, cls):
    """Put every odd and broken case ImageNet has into root/train/<cls>.

    Returns {relative path: None (must be stored) or 'skip' (must be reported)}.
    """
    d = os.path.join(root, "train", cls)
    rng = np.random.default_rng(7)
    base = Image.open(io.BytesIO(imagenet_like_jpeg(_base_photo(), rng))).convert("RGB")
    out = {}

    def save(name, fn, expect):
        path = os.path.join(d, name)
        fn(path)
        out[os.path.join(cls, name)] = expect

    save("cmyk.JPEG", lambda p: base.convert("CMYK").save(p, "JPEG", quality=92), None)
    save("gray.JPEG", lambda p: base.convert("L").save(p, "JPEG", quality=90), None)
    save("png_named.JPEG", lambda p: base.save(p, "PNG"), None)
    save("rgba.png", lambda p: base.convert("RGBA").save(p, "PNG"), None)
    save("progressive.JPEG", lambda p: base.save(p, "JPEG", quality=90, progressive=True), None)

    def exif(p):
        ex = Image.Exif()
        ex[0x0112] = 6  # orientation: rotate 90 CW
        base.save(p, "JPEG", quality=90, exif=ex.tobytes())
    save("exif_rotated.JPEG", exif, None)

    def truncated(p):
        buf = io.BytesIO()
        base.save(buf, "JPEG", quality=90)
        with open(p, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    save("truncated.JPEG", truncated, "skip")
    save("empty.JPEG", lambda p: open(p, "wb").close(), "skip")
    save("garbage.JPEG", lambda p: open(p, "wb").write(b"not an image at all" * 10), "skip")
    save(".DS_Store", lambda p: open(p, "wb").write(b"\0\0\0\1Bud1"), "skip")
    save("notes.txt", lambda p: open(p, "w").write("hello"), "skip")
    return out


def _base_photo():
    from imagenet_seq.tools.sample import _photos

    return _photos()[0][1]


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory):
    """A small clean ImageFolder: 4 classes x 12 train, 4 classes x 3 val (real photo crops)."""
    root = tmp_path_factory.mktemp("imagenet")
    classes = make_sample_imagefolder(str(root), train_per_class=12, val_per_class=3,
                                      num_classes=4, seed=1)
    return str(root), classes


def strip_offsets(src_root: str, dst_root: str) -> str:
    """A copy of a converted folder whose splits have no offsets index (as an older imagenet_seq
    wrote them): readers take the B-tree path."""
    from imagenet_seq import format as fmt
    from imagenet_seq.format.offsets import OFFSETS_KEY

    os.makedirs(dst_root, exist_ok=True)
    for split in fmt.SPLITS:
        src = os.path.join(src_root, fmt.split_filename(split))
        if not os.path.exists(src):
            continue
        dst = os.path.join(dst_root, fmt.split_filename(split))
        shutil.copy(src, dst)
        env = fmt.open_env(dst, readonly=False, lock=False)
        with env.begin(write=True) as txn:
            assert txn.delete(OFFSETS_KEY)
        env.close()
    return dst_root


@pytest.fixture(scope="session")
def sample_lmdb_no_index(sample_lmdb, tmp_path_factory):
    """sample_lmdb without the offsets index."""
    return strip_offsets(sample_lmdb, str(tmp_path_factory.mktemp("lmdb_no_index")))


@pytest.fixture(scope="session")
def sample_lmdb(sample_tree, tmp_path_factory):
    """sample_tree converted with preprocess (train + val)."""
    from imagenet_seq.convert.cli import main

    out = str(tmp_path_factory.mktemp("lmdb"))
    assert main([sample_tree[0], out, "--workers", "0", "--no-progress"]) == 0
    return out
