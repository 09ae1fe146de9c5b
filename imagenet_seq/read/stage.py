"""The read stage: spans in, ``(record, jpeg bytes, label)`` items out, in order.

:func:`read` walks a list of ``(first record, count)`` spans with one
:class:`~imagenet_seq.read.reader.SplitReader` (one forward cursor per span, read-ahead across
spans; a sharded split: spans cut at shard boundaries, one read-ahead per device), stopping
early when ``stop`` is set. It holds no state a resume needs: the plan says
where a resumed epoch reads from. :func:`read_records` reads a scattered set of records (a
resumed shuffle buffer) as few forward spans.
"""
from __future__ import annotations

import threading
from typing import Dict, Iterator, Optional, Sequence, Tuple

from imagenet_seq.plan.stage import merge_ids

__all__ = ["Item", "read", "read_records"]

Item = Tuple[int, bytes, int]


def read(reader, spans: Sequence[Tuple[int, int]],
         stop: Optional[threading.Event] = None) -> Iterator[Item]:
    """The records of ``spans``, in order (``stop`` set: it ends early). A list goes as it
    is: the node plan's spans are tagged (:class:`imagenet_seq.plan.node.EpochSpans`) and a
    node client reads them through the node's reader."""
    return iter(reader.read_spans(spans if isinstance(spans, list) else list(spans), stop))


def read_records(reader, ids: Sequence[int],
                 stop: Optional[threading.Event] = None) -> Dict[int, Item]:
    """Records ``ids`` (any order) -> ``{id: item}``, read as sorted forward spans."""
    return {item[0]: item for item in reader.read_spans(merge_ids(ids), stop)}
