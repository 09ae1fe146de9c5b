"""Which WebDataset shards a user means, which split each one is, and the class list.

* Brace patterns, as WebDataset, timm and the shell write shard lists:
  ``imagenet22k-train-{0000..4095}.tar`` (a numeric range; zero padding when an end is
  written with a leading zero), ``{train,validation}`` (a list); nested and several groups
  expand left to right. A pattern is expanded only when no file has its literal name.
* The split of a shard: a word of its file name (split at ``-``, ``_``, ``.``): ``train`` ->
  train, ``val`` or ``validation`` -> val (timm: ``imagenet22k-train-0000.tar``,
  ``imagenet1k-validation-00.tar``); else the name of the folder holding it (``train/``,
  ``val/``). Shards that name no split are the one split of ``--splits``.
* ``--classes FILE``: one class name per line, label i = line i + 1 (the first line is label
  0), e.g. timm's ``imagenet22k_synsets.txt`` for its ImageNet-22k shards.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

from imagenet_seq.convert.scan import ScanError

__all__ = ["expand_braces", "split_of", "read_classes", "SPLIT_WORDS"]

SPLIT_WORDS: Dict[str, str] = {"train": "train", "val": "val", "validation": "val"}
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
MAX_EXPANSION = 1_000_000


def _group(s: str, start: int) -> Optional[int]:
    """Index of the ``}`` closing the ``{`` at ``start``, or None."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _alternatives(body: str) -> Optional[List[str]]:
    """What one brace group stands for, or None when it is no pattern (``{x}``: literal)."""
    m = _RANGE.fullmatch(body)
    if m:
        a, b = m.group(1), m.group(2)
        lo, hi = int(a), int(b)
        width = max(len(a.lstrip("-")), len(b.lstrip("-"))) \
            if a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0") else 0
        if abs(hi - lo) >= MAX_EXPANSION:
            raise ScanError(f"{{{body}}} stands for {abs(hi - lo) + 1} names; at most "
                            f"{MAX_EXPANSION}")
        step = 1 if hi >= lo else -1
        return [f"{n:0{width}d}" if n >= 0 else f"-{-n:0{width}d}"
                for n in range(lo, hi + step, step)]
    parts, depth, cut = [], 0, 0
    for i, c in enumerate(body):
        depth += c == "{"
        depth -= c == "}"
        if c == "," and depth == 0:
            parts.append(body[cut:i])
            cut = i + 1
    if not parts:
        return None
    return parts + [body[cut:]]


def expand_braces(pattern: str) -> List[str]:
    """The names a brace pattern stands for, in order (``a{1..3}`` -> a1, a2, a3;
    ``{00..02}`` -> 00, 01, 02; ``x{a,b}y`` -> xay, xby). A group that is neither a range nor
    a list is kept as written."""
    start = 0
    while True:
        i = pattern.find("{", start)
        if i < 0:
            return [pattern]
        j = _group(pattern, i)
        if j is None:
            return [pattern]
        alts = _alternatives(pattern[i + 1:j])
        if alts is None:
            start = i + 1
            continue
        out: List[str] = []
        head, tail = pattern[:i], pattern[j + 1:]
        for alt in alts:
            # the alternative and what follows may hold more groups; the head holds none
            out.extend(head + rest for rest in expand_braces(alt + tail))
            if len(out) > MAX_EXPANSION:
                raise ScanError(f"{pattern} stands for more than {MAX_EXPANSION} names")
        return out


def split_of(path: str) -> Optional[str]:
    """The split a shard's file name says (or its folder's name), or None.

    Raises:
        ScanError: the name says two splits (``train-val-0.tar``).
    """
    stem = os.path.basename(path)
    words = {SPLIT_WORDS[w] for w in re.split(r"[-_.]", stem.lower()) if w in SPLIT_WORDS}
    if len(words) > 1:
        raise ScanError(f"shard {path} names both splits ({stem}); rename it, or convert the "
                        "splits one at a time from shards whose names say one")
    if words:
        return words.pop()
    return SPLIT_WORDS.get(os.path.basename(os.path.dirname(os.path.abspath(path))).lower())


def read_classes(path: str) -> List[str]:
    """``--classes FILE``: class i = line i + 1, names stripped of surrounding white space.

    Raises:
        ScanError: missing file, an empty line or a control character inside the list, a name
            twice, no names.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ScanError(f"--classes {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScanError(f"--classes {path} cannot be read ({e}); expected a UTF-8 text file, "
                        "one class name per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ScanError(f"--classes {path} holds no class names; expected one per line, "
                        "label 0 on the first")
    seen: Dict[str, int] = {}
    out = []
    for n, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise ScanError(f"--classes {path}:{n}: an empty line; every line names the class "
                            f"of label {n - 1} (label i = line i + 1), so none may be empty")
        if re.search(r"[\x00-\x1f\x7f]", name):
            raise ScanError(f"--classes {path}:{n}: {name!r} holds a control character; "
                            "one plain class name per line")
        if name in seen:
            raise ScanError(f"--classes {path}: {name!r} on lines {seen[name]} and {n}; each "
                            "class once (label i = line i + 1)")
        seen[name] = n
        out.append(name)
    return out
