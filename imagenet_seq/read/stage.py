"""The read stage: spans in, ``(record, jpeg bytes, label)`` items out, in order.

:class:`Read` walks a list of ``(first record, count)`` spans with one
:class:`~imagenet_seq.read.reader.SplitReader` (one forward cursor per span, read-ahead across
spans), stopping early when ``stop`` is set. ``state()`` says how many records it yielded;
``close()`` closes the generator (and with it the read-ahead thread). :func:`read_records`
reads a scattered set of records (a resumed shuffle buffer) as few forward spans.
"""
from __future__ import annotations

import threading
from typing import Dict, Iterator, Optional, Sequence, Tuple

from imagenet_seq.plan.stage import merge_ids

Item = Tuple[int, bytes, int]


class Read:
    def __init__(self, reader, spans: Sequence[Tuple[int, int]],
                 stop: Optional[threading.Event] = None):
        self.reader, self.spans, self.stop = reader, list(spans), stop
        self.records = 0
        self._gen: Optional[Iterator[Item]] = None

    def __iter__(self) -> Iterator[Item]:
        self._gen = self.reader.read_spans(self.spans, self.stop)
        for item in self._gen:
            self.records += 1
            yield item

    def state(self) -> Dict[str, int]:
        return {"records": self.records}

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()


def read_records(reader, ids: Sequence[int],
                 stop: Optional[threading.Event] = None) -> Dict[int, Item]:
    """Records ``ids`` (any order) -> ``{id: item}``, read as sorted forward spans."""
    return {item[0]: item for item in reader.read_spans(merge_ids(ids), stop)}
