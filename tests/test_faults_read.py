"""Fault injection, reader half: damaged copies of a small converted split, read by the Loader
(``verify=True``) and by ``imagenet-seq-verify``, each case in a child process under a timeout.

Every case must end in correct output (the same images and targets as the clean file) or an
error that names the file and the way out; a signal (SIGBUS, SIGSEGV), a hang, an unclear error
or a silently different output fails the test, naming the case. Truncations and flipped bytes
inside a record must be errors; ``imagenet-seq-verify`` must name a flipped record by key.

One child runs the cases in turn (importing torch once); a child killed by a signal or stuck
past the timeout is recorded against its case and replaced for the next one.
"""
import json
import os
import select
import shutil
import subprocess
import sys
import time

import numpy as np

from imagenet_seq.format import checksums
from imagenet_seq import format as fmt
from imagenet_seq.format import offsets

CASE_TIMEOUT_S = 60
REMEDIES = ("re-copy", "re-convert", "--overwrite", "imagenet-seq-verify", "--rebuild",
            "preprocess_sequential")


# -- the child: runs one case per line of stdin, one JSON result per line of stdout ------------
def _child(clean: str, workdir: str) -> None:
    import hashlib

    from imagenet_seq.data import Loader
    from imagenet_seq.tools.verify import verify_split

    def run_loader(root):
        loader = Loader(root, "train", batch_size=16, num_workers=0, shuffle=False,
                        verify=True, stall_timeout=20)
        h = hashlib.sha1()
        for images, targets in loader:
            h.update(images.numpy().tobytes())
            h.update(targets.numpy().tobytes())
        return h.hexdigest()

    def error(e, path):
        msg = str(e)
        clear = os.path.basename(path) in msg and any(r in msg for r in REMEDIES)
        return {"error": type(e).__name__, "message": msg[:400], "clear": clear}

    want = run_loader(os.path.dirname(clean))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        root = os.path.join(workdir, case["name"])
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, fmt.split_filename("train"))
        shutil.copy(clean, path)
        with open(path, "r+b") as f:
            if case["kind"] == "truncate":
                f.truncate(case["at"])
            else:
                f.seek(case["at"])
                byte = f.read(1)[0]
                f.seek(case["at"])
                f.write(bytes([byte ^ (1 << case["bit"])]))
        out = {"name": case["name"]}
        try:
            out["loader"] = "correct" if run_loader(root) == want else "WRONG"
        except Exception as e:  # noqa: BLE001 - classified, not hidden
            out["loader"] = error(e, path)
        report = verify_split(path)
        out["verify"] = {"ok": report.ok, "keys": sorted({k for k, _ in report.problems})}
        if True:  # the index command died with SIGBUS on truncated files too
            try:
                offsets.add_to(path, rebuild=True)
                out["rebuild"] = "ran"
            except Exception as e:  # noqa: BLE001
                out["rebuild"] = error(e, path)
        shutil.rmtree(root)
        print(json.dumps(out), flush=True)


# -- the cases -------------------------------------------------------------------------------
def _layout(path):
    """Where things lie in the clean file: record values, metadata values, B-tree pages."""
    env = fmt.open_env(path)
    try:
        psize = env.stat()["psize"]
        base = fmt.map_base(path)
        with env.begin(buffers=True) as txn:
            meta = fmt.read_metadata(txn, path)

            def span(key):
                v = txn.get(key)
                return np.frombuffer(v, np.uint8).ctypes.data - base, len(v)

            named = {k.decode(): span(k) for k in
                     (fmt.META_KEY, fmt.LABELS_KEY, offsets.OFFSETS_KEY, checksums.CRC_KEY)}
        offs, lens = offsets.read(env, meta.num_records, path)
    finally:
        env.close()
    size = os.path.getsize(path)
    tree, page = [], 2
    with open(path, "rb") as f:
        while page * psize < size:
            f.seek(page * psize + 10)
            head = f.read(6)
            flags, count = int.from_bytes(head[:2], "little"), int.from_bytes(head[2:], "little")
            if flags & 0x04:  # an overflow run: its later pages are value bytes, no header
                page += max(1, count)
                continue
            if flags & 0x03:
                tree.append(page)
            page += 1
    return psize, size, offs, lens, named, tree, meta.num_records


def _cases(path):
    psize, size, offs, lens, named, tree, n = _layout(path)
    rng = np.random.default_rng(int(os.environ.get("IMAGENET_SEQ_FAULT_SEED", "12")))
    cases = []

    def add(name, kind, at, bit=0, expect="any", key=None):
        cases.append({"name": name, "kind": kind, "at": int(at), "bit": int(bit),
                      "expect": expect, "key": key})

    # truncation: page boundaries, header pages, metadata, the index, the middle of records
    for at in (0, 1, 100, psize - 1, psize, psize + 200, 2 * psize, 3 * psize,
               size // 2 - size // 2 % psize, size - psize, size - 1):
        add(f"trunc@{at}", "truncate", at, expect="error")
    for k in (0, n // 2, n - 1):
        add(f"trunc-mid-record-{k}", "truncate", offs[k] + lens[k] // 2, expect="error")
    for key, (off, length) in named.items():
        add(f"trunc-in-{key}", "truncate", off + length // 2, expect="error")
    # bit flips in records: the JPEG bytes (checksum) and the label header
    for k in rng.choice(n, 6, replace=False):
        at = offs[k] + 4 + rng.integers(0, lens[k] - 4)
        add(f"flip-record-{k}@{at}", "flip", at, rng.integers(8), "error", fmt.record_key(k))
    for k in rng.choice(n, 2, replace=False):
        add(f"flip-label-{k}", "flip", offs[k] + rng.integers(0, 4), rng.integers(8), "error",
            fmt.record_key(k))
    # bit flips in B-tree pages (headers, node offsets, keys, sizes, page numbers)
    with open(path, "rb") as f:  # where the bytes in use are: header + pointers, then nodes
        used = []
        for page in tree:
            f.seek(page * psize + 12)
            lower, upper = np.frombuffer(f.read(4), "<u2")
            used += [page * psize + o for o in range(int(lower))]
            used += [page * psize + o for o in range(int(upper), psize)]
    for at in rng.choice(used, 16, replace=False):
        add(f"flip-btree-p{at // psize}@{at}", "flip", at, rng.integers(8))
    # bit flips in the two LMDB meta pages (magic, page size, last page, txn id, roots)
    for meta_page in (0, 1):
        for _ in range(3):
            add(f"flip-meta{meta_page}@{meta_page * psize + 16 + (j := rng.integers(0, 144))}",
                "flip", meta_page * psize + 16 + j, rng.integers(8))
    # bit flips in the metadata records
    for key, (off, length) in named.items():
        add(f"flip-{key}", "flip", off + rng.integers(0, length), rng.integers(8))
    return cases


class _Child:
    def __init__(self, clean, workdir):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", clean, workdir], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert self.read(120) == {"ready": True}

    def read(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def _judge(case, res):
    """The failures of one case's result (empty: it passed)."""
    bad = []
    for what in ("loader", "rebuild"):
        r = res.get(what)
        if r is None:
            continue
        if r in ("correct", "ran"):
            # the index command checks the file's structure, not the records' bytes
            if case["expect"] == "error" and (what == "loader" or case["kind"] == "truncate"):
                bad.append(f"{what}: no error although the file is damaged")
        elif r == "WRONG":
            bad.append(f"{what}: different output without an error")
        elif not r["clear"]:
            bad.append(f"{what}: unclear {r['error']}: {r['message']}")
    if case["expect"] == "error" and res["verify"]["ok"]:
        bad.append("imagenet-seq-verify found nothing")
    if case["key"] is not None and case["key"] not in res["verify"]["keys"]:
        bad.append(f"imagenet-seq-verify did not name {case['key']}")
    return bad


def _outcome(res):
    r = res.get("loader")
    if r == "correct":
        return "correct output"
    if isinstance(r, dict):
        return f"clear error ({r['error']})" if r["clear"] else f"UNCLEAR {r['error']}"
    return str(r)


def test_damaged_files_never_crash_hang_or_lie(sample_lmdb, tmp_path, capsys):
    clean = os.path.join(sample_lmdb, fmt.split_filename("train"))
    cases = _cases(clean)
    for c in cases:
        if c["key"] is not None:
            c["key"] = c["key"].decode()
    t0 = time.monotonic()
    child, failures, outcomes = None, [], {}
    for case in cases:
        if child is None:
            child = _Child(clean, str(tmp_path))
        child.proc.stdin.write(json.dumps(case) + "\n")
        child.proc.stdin.flush()
        res = child.read(CASE_TIMEOUT_S)
        if res is None:
            try:  # the child closed its output (died) or said nothing for the whole timeout
                rc = child.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                rc = None
            child.kill()
            child = None
            what = f"killed by signal {-rc}" if rc is not None and rc < 0 else \
                f"exit {rc}" if rc is not None else f"hung past {CASE_TIMEOUT_S} s"
            failures.append(f"{case['name']}: {what}")
            outcomes[what] = outcomes.get(what, 0) + 1
            continue
        for b in _judge(case, res):
            failures.append(f"{case['name']}: {b}")
        key = _outcome(res)
        outcomes[key] = outcomes.get(key, 0) + 1
    if child is not None:
        child.proc.stdin.close()
        child.proc.wait(timeout=30)
    with capsys.disabled():
        print(f"\nfault injection (reader): {len(cases)} cases in "
              f"{time.monotonic() - t0:.1f} s: " +
              ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())))
    assert not failures, "\n".join(failures)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _child(sys.argv[2], sys.argv[3])
