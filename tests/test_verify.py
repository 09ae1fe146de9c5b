"""Record checksums: written at conversion (resume included), checked by imagenet-seq-verify
and by Loader(verify=True); files without them still load and can get them."""
import json
import os
import shutil
import zlib

import lmdb
import pytest

from imagenet_seq.format import checksums
from imagenet_seq.format import offsets
from imagenet_seq import format as fmt
from imagenet_seq.data import Loader, RecordError
from imagenet_seq.tools.verify_cli import main as verify


def _copy(sample_lmdb, tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    for split in fmt.SPLITS:
        shutil.copy(fmt.find_split(sample_lmdb, split), root / fmt.split_filename(split))
    return str(root), str(root / fmt.split_filename("train"))


def _flip(path, record, at=3000):
    env = fmt.open_env(path)
    offs, _ = offsets.read(env, 48, path)
    env.close()
    with open(path, "r+b") as f:
        f.seek(int(offs[record]) + at)
        byte = f.read(1)[0]
        f.seek(int(offs[record]) + at)
        f.write(bytes([byte ^ 0x04]))


def test_conversion_stores_the_checksum_of_every_value(sample_lmdb):
    path = fmt.find_split(sample_lmdb, "train")
    env = fmt.open_env(path)
    with env.begin() as txn:
        crcs = checksums.read(txn, 48, path)
        assert [zlib.crc32(txn.get(fmt.record_key(i))) for i in range(48)] == crcs.tolist()
        assert txn.get(checksums.part_key(0)) is None  # the parts were joined
    env.close()


def test_log_keeps_checksums_across_commits_and_fills_gaps(tmp_path):
    env = lmdb.open(str(tmp_path / "x.lmdb"), subdir=False, map_size=1 << 24)
    values = [os.urandom(50 + i) for i in range(7)]
    with env.begin(write=True) as txn:  # records 0-1: a version without checksums wrote them
        for i in range(2):
            txn.put(fmt.record_key(i), values[i])
    log = checksums.Log(2)  # a resume after them
    for start, stop in [(2, 4), (4, 7)]:
        with env.begin(write=True) as txn:
            for i in range(start, stop):
                txn.put(fmt.record_key(i), values[i])
                log.add(values[i])
            log.commit(txn)
    with env.begin(write=True) as txn:
        log.finish(txn, 7)
    with env.begin() as txn:
        assert checksums.read(txn, 7, "x").tolist() == [zlib.crc32(v) for v in values]
        assert not [k for k, _ in txn.cursor() if k.startswith(checksums.PART_PREFIX)]
    env.close()


def test_verify_names_every_bad_record(sample_lmdb, tmp_path, capsys):
    root, path = _copy(sample_lmdb, tmp_path)
    assert verify([root, "--no-progress"]) == 0
    assert capsys.readouterr().out.count(": OK (") == 2
    _flip(path, 7)
    env = fmt.open_env(path)
    offs, _ = offsets.read(env, 48, path)
    env.close()
    with open(path, "r+b") as f:
        f.seek(int(offs[11]))
        f.write(fmt.RECORD_HEADER.pack(999))
    assert verify([root, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "00000007  checksum mismatch" in out and "00000011  label 999 outside 0..3" in out
    assert verify([root, "--json", "--splits", "train"]) == 1
    (report,) = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["checksums"] and report["checked"] == 48
    assert {p["key"] for p in report["problems"]} >= {"00000007", "00000011", "__meta__"}
    assert verify([str(tmp_path / "nothing")]) == 2


def test_loader_verify_catches_a_flip_that_still_decodes(sample_lmdb, tmp_path):
    root, path = _copy(sample_lmdb, tmp_path)
    _flip(path, 7)
    kw = dict(batch_size=8, shuffle=False)
    assert sum(len(y) for _, y in Loader(root, "train", num_workers=0, **kw)) == 48  # silent
    for workers, wtype in [(0, "thread"), (2, "thread"), (2, "process")]:
        with pytest.raises(RecordError, match=r"00000007.*failed its checksum.*"
                                              r"imagenet-seq-verify") as e:
            for _ in Loader(root, "train", num_workers=workers, worker_type=wtype, verify=True,
                            **kw):
                pass
        assert e.value.key == b"00000007"
    ld = Loader(root, "train", num_workers=2, verify=True, skip_broken=True, **kw)
    assert sum(len(y) for _, y in ld) == 47 and ld.skipped_records[0][0] == 7
    raw = Loader(root, "train", decoder=lambda jpegs, labels: (jpegs, labels), verify=True, **kw)
    with pytest.raises(RecordError, match="00000007.*failed its checksum"):
        list(raw)


def test_files_without_checksums_load_and_can_get_them(sample_lmdb, tmp_path, capsys):
    root, path = _copy(sample_lmdb, tmp_path)
    env = fmt.open_env(path, readonly=False, lock=False)
    with env.begin(write=True) as txn:
        txn.delete(checksums.CRC_KEY)
    offsets.write(env, path, 48)  # as an older conversion left it: index current
    env.close()
    assert sum(len(y) for _, y in Loader(root, "train", num_workers=0)) == 48
    with pytest.raises(ValueError, match=r"no record checksums.*--add-checksums"):
        Loader(root, "train", verify=True)
    assert verify([root, "--no-progress", "--splits", "train"]) == 0
    assert "NO checksums" in capsys.readouterr().out
    assert verify([root, "--add-checksums", "--splits", "train", "--no-progress"]) == 0
    assert "checksums added (48 records)" in capsys.readouterr().out
    ld = Loader(root, "train", num_workers=0, verify=True)
    assert ld.reader.indexed  # the index was rewritten with them, not left stale
    assert sum(len(y) for _, y in ld) == 48
