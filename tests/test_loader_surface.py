"""The Loader's public surface is documented in one place: its signature, its docstring and
docs/loader.md name the same options in the same groups (the groups of ``loader.settings``),
and every public attribute of the Loader is named in docs/loader.md."""
import dataclasses
import inspect
import os
import re

from imagenet_seq.data import Loader
from imagenet_seq.loader.config import Settings

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                    "loader.md")
GROUPS = [f.name for f in dataclasses.fields(Settings)]
UNGROUPED = {"root", "mode", "transform"}


def _signature_groups():
    out, group = {}, None
    for line in inspect.getsource(Loader.__init__).splitlines():
        comment = re.match(r"\s*# (\w+)$", line)
        if comment:
            group = comment.group(1)
            continue
        for name in re.findall(r"(\w+): ", line):
            if name not in UNGROUPED and name != "self":
                out[name] = group
        if line.rstrip().endswith("):"):
            break
    return out


def _docstring_groups():
    doc = Loader.__doc__
    args = doc[doc.index("    Args:"):]
    out, group = {}, None
    for line in args.splitlines():
        head = re.match(r"^ {8}(\w+) -- ", line)
        if head:
            group = head.group(1).lower()
            continue
        entry = re.match(r"^ {8}([a-z_][a-z_, /]*):", line)
        if entry:
            for name in re.split(r"[,/]", entry.group(1)):
                if name.strip() not in UNGROUPED:
                    out[name.strip()] = group
    return out


def _docs_groups():
    out = {}
    for group, cells in re.findall(r"^\| (\w+) \| (.*) \|$", open(DOCS).read(), re.M):
        if group in GROUPS:
            for name in re.findall(r"`([a-z_]+)[=`]", cells):
                out[name] = group
    return out


def test_signature_docstring_and_docs_group_the_same_options():
    sig = _signature_groups()
    params = set(inspect.signature(Loader.__init__).parameters) - UNGROUPED - {"self"}
    assert set(sig) == params and set(sig.values()) == set(GROUPS)
    assert _docstring_groups() == sig
    assert _docs_groups() == sig


def test_every_public_attribute_is_in_the_docs():
    text = open(DOCS).read()
    public = [n for n in dir(Loader) if not n.startswith("_")]
    assert "settings" in public and "state_dict" in public
    missing = [n for n in public if f"`{n}" not in text]
    assert missing == []
