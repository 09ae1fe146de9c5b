"""What one split's conversion is asked (:class:`Options`) and what it reports
(:class:`Result`): plain values, passed from the CLI through ``writer`` to the passes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from imagenet_seq.convert.passes import DEFAULT_MEMORY

__all__ = ["Options", "Result"]


@dataclass
class Options:
    seed: int = 0
    max_size: Optional[int] = None
    quality: int = 95
    workers: int = 0
    strict: bool = False
    memory: int = DEFAULT_MEMORY  # bytes: the buffers' bound (writer's module docstring)
    tmp: Optional[str] = None  # folder for the sorted runs (default: the output folder)
    read_order: str = "auto"  # disk_order method: auto (FIEMAP, else inode), inode, name
    read_ahead: Optional[int] = None  # read-ahead window, files (None: source_reader's)
    shards: Optional[int] = None  # K shard files (None: from shard_gb, else one file)
    shard_gb: Optional[float] = None  # K = manifest.shard_count(estimated bytes, shard_gb)
    shard_dirs: Tuple[str, ...] = ()  # folders beside the output folder, shards round-robin

    def content(self) -> dict:
        """Options that change what is written (workers do not)."""
        return {"seed": self.seed, "max_size": self.max_size, "quality": self.quality}


@dataclass
class Result:
    split: str
    path: str
    written: int = 0
    converted: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    resumed_at: int = 0
    already_complete: bool = False
    report: Optional[str] = None  # the skipped-files report the CLI wrote
    read_order: str = "-"  # how the source was ordered (disk_order): fiemap, inode, name
    runs: int = 0
    tmp_bytes: int = 0  # temporary bytes written (the runs)
    read_s: float = 0.0  # wall seconds of pass 1 (read, validate, write the runs)
    merge_s: float = 0.0  # wall seconds of pass 2 (merge into the LMDB, offsets index)
    read_cpu_s: float = 0.0  # CPU seconds of this process (all its threads) in pass 1
    merge_cpu_s: float = 0.0  # and in pass 2 (workers not included)
    shards: List[dict] = field(default_factory=list)  # index, path, folder, records, bytes, ..
    manifest: Optional[str] = None  # the manifest's path (None: one file)
