"""A converted split with one record's JPEG replaced by garbage: what the broken-record tests read."""
import os
import shutil

from imagenet_seq import format as fmt
from imagenet_seq.format import offsets


def write_broken_lmdb(src_root: str, dst: str, bad_index: int = 7) -> str:
    """A copy of ``src_root``'s train split in ``dst`` with record ``bad_index`` replaced by
    bytes that are not a JPEG (label kept); returns ``dst``."""
    os.makedirs(dst, exist_ok=True)
    path = os.path.join(dst, fmt.split_filename("train"))
    shutil.copy(fmt.find_split(src_root, "train"), path)
    env = fmt.open_env(path, readonly=False)
    with env.begin(write=True) as txn:
        _, label = fmt.decode_record(txn.get(fmt.record_key(bad_index)))
        txn.put(fmt.record_key(bad_index), fmt.encode_record(label, b"\xff\xd8 not a jpeg"))
    env.close()
    offsets.add_to(path, rebuild=True)  # the write moved records: a fresh index, no stale warning
    return dst
