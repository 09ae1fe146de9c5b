"""The one sequential reader: contiguous record ranges of one split's LMDB, in file order."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

from . import format as fmt


class SplitReader:
    """Reads records of one split. Opens the LMDB lazily (after fork), in ``reset_state``;
    readers of the same file in one process share one environment (``format.acquire_env``).

    ``meta`` and ``labels`` are read once at construction with a short-lived environment, so an
    object can be built in the parent and used in a child process.
    """

    def __init__(self, root: str, split: str):
        self.path = fmt.find_split(root, split)
        self.split = split
        env = fmt.acquire_env(self.path)
        try:
            with env.begin() as txn:
                self.meta = fmt.read_metadata(txn, self.path)
                self.labels: Optional[np.ndarray] = fmt.read_labels(txn, self.meta)
        finally:
            fmt.release_env(self.path)
        self.legacy = self.meta.legacy
        self._env = None

    def __len__(self) -> int:
        return self.meta.num_records

    def reset_state(self) -> None:
        self.close()
        self._env = fmt.acquire_env(self.path)

    def close(self) -> None:
        if self._env is not None:
            self._env = None
            fmt.release_env(self.path)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_env"] = None
        return state

    def read_range(self, start: int, count: int) -> Iterator[Tuple[int, bytes, int]]:
        """Yield ``(index, jpeg_bytes, label)`` for records ``start .. start+count-1``, in order.

        One cursor walks the range forward: the access pattern a disk serves at full bandwidth.
        """
        if self._env is None:
            self.reset_state()
        if count <= 0:
            return
        if start < 0 or start + count > self.meta.num_records:
            raise IndexError(f"range [{start}, {start + count}) outside 0..{self.meta.num_records}")
        with self._env.begin(buffers=True) as txn:
            cur = txn.cursor()
            if not cur.set_key(fmt.record_key(start)):
                raise KeyError(f"{self.path}: record {fmt.record_key(start)!r} missing")
            for i in range(start, start + count):
                key, value = cur.item()
                if bytes(key) != fmt.record_key(i):
                    raise KeyError(f"{self.path}: expected key {fmt.record_key(i)!r}, "
                                   f"found {bytes(key)!r}; the file is damaged")
                if self.legacy:
                    jpeg, label = fmt.decode_legacy_value(value)
                else:
                    view, label = fmt.decode_record(value)
                    jpeg = view.tobytes()  # copy out: buffers die with the transaction
                yield i, jpeg, label
                if i + 1 < start + count and not cur.next():
                    raise KeyError(f"{self.path}: file ends before record {i + 1}")

    def read_all(self) -> Iterator[Tuple[int, bytes, int]]:
        return self.read_range(0, self.meta.num_records)
