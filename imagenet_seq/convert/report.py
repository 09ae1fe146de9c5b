"""``ILSVRC-<split>.report.tsv``: the files a conversion did not store, one line each.

Format: a header line ``path<TAB>reason``, then one line per skipped file: its path relative to
the split folder (or, for an unsafe tar member name, the name as the archive spells it) and
why it was not stored. Every row is one line of exactly two fields, whatever the names hold:
in both fields a backslash is written ``\\\\``, a tab ``\\t``, a newline ``\\n``, a carriage
return ``\\r`` (the escaping of PostgreSQL's text format and of "linear TSV"), and any other
control character (U+0000-U+001F, U+007F, U+0085) or line separator (U+2028, U+2029) as
``\\xHH`` / ``\\uHHHH``, as Python writes them; nothing else is changed. So ``cut -f1``,
``grep``, ``wc -l`` and ``str.splitlines`` see one row per file, printing the report cannot
send control sequences to a terminal, and an ordinary name is written as it is. Read it back
with :func:`read_report`, or with ``csv.reader(f, delimiter="\\t", quoting=csv.QUOTE_NONE)``
and :func:`unescape` on each field.

Names that are not UTF-8 are written as their bytes on disk (``surrogateescape``), so the
report names the file exactly; open the report with ``errors="surrogateescape"`` to get the
names ``os.listdir`` gives.
"""
from __future__ import annotations

import csv
import os
import re
from typing import List, Optional, Sequence, Tuple

__all__ = ["report_path", "escape", "unescape", "write_report", "read_report"]

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
# the backslash, control characters, and what Python's str.splitlines also breaks lines at
_SPECIAL = re.compile("[\\\\\x00-\x1f\x7f\x85\u2028\u2029]")
_ESCAPED = re.compile(r"\\(?:[\\tnr]|x[0-9a-f]{2}|u[0-9a-f]{4})")


def _escape_one(m) -> str:
    c = m.group()
    return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def _unescape_one(m) -> str:
    e = m.group()
    return _UNESCAPES.get(e) or chr(int(e[2:], 16))


def report_path(dst: str, split: str) -> str:
    return os.path.join(dst, f"ILSVRC-{split}.report.tsv")


def escape(field: str) -> str:
    """One report field on one line, safe to print (see the module's docstring)."""
    return _SPECIAL.sub(_escape_one, field)


def unescape(field: str) -> str:
    """The inverse of :func:`escape`."""
    return _ESCAPED.sub(_unescape_one, field)


def write_report(dst: str, split: str, skipped: Sequence[Tuple[str, str]]) -> Optional[str]:
    """Write ``skipped`` ((path, reason) pairs) as the split's report and return its path;
    with nothing skipped, remove a report left by an earlier run and return None."""
    path = report_path(dst, split)
    if not skipped:
        if os.path.exists(path):
            os.remove(path)
        return None
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write("path\treason\n")
        for rel, reason in skipped:
            f.write(f"{escape(rel)}\t{escape(reason)}\n")
    return path


def read_report(path: str) -> List[Tuple[str, str]]:
    """The (path, reason) rows of a report, names exactly as they were (not UTF-8 ones as
    ``os.listdir`` gives them)."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(unescape(p), unescape(r)) for p, r in rows[1:]]
