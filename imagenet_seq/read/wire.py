"""Messages between a node reader and its ranks: framed, over one Unix stream socket per rank.

A message is a 12-byte header (4-byte kind, JSON length, payload length), a small JSON object
(control: requests, frees, errors) and a binary payload (an array of record references, or the
bytes of one record too large for a ring). No pickling: both ends parse what they expect and
nothing else. File descriptors (a rank's ring) travel with a message as ``SCM_RIGHTS``.

The socket is also how each side learns that the other died: the kernel closes a killed
process's sockets, so the peer's next ``recv`` returns end-of-file at once (no heartbeats, no
pid polling). Addresses are Linux abstract names: they vanish with the last process holding
them, so nothing is ever left in the filesystem.
"""
from __future__ import annotations

import array
import json
import socket
import struct
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["HELLO", "WELCOME", "READ", "CANCEL", "FREE", "BYE", "ITEMS", "BIG", "DONE", "FAIL",
           "REFS", "NodeReaderError", "Closed", "send", "recv", "address", "peer_uid"]

# rank -> reader
HELLO, READ, CANCEL, FREE, BYE = b"HELO", b"READ", b"CNCL", b"FREE", b"BYE_"
# reader -> rank
WELCOME, ITEMS, BIG, DONE, FAIL = b"WELC", b"ITEM", b"BIG_", b"DONE", b"FAIL"
KINDS = {HELLO, READ, CANCEL, FREE, BYE, WELCOME, ITEMS, BIG, DONE, FAIL}

#: One record placed in a ring: its index, label, length and absolute ring position.
REFS = np.dtype([("record", "<i8"), ("label", "<i8"), ("nbytes", "<i8"), ("pos", "<i8")])

_HEADER = struct.Struct("<4sII")
_MAX_JSON = 1 << 20


class NodeReaderError(RuntimeError):
    """The node reader, or another rank of the node, failed; the message says which."""


class Closed(ConnectionError):
    """The peer closed the socket (or died: the kernel closed it)."""


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def address(key: str) -> str:
    """The abstract socket name for ``key`` (a leading NUL: not a file)."""
    return "\0imagenet_seq/" + key


def send(sock: socket.socket, kind: bytes, head: Optional[dict] = None,
         payload=b"", fds: Sequence[int] = ()) -> None:
    """One message; ``payload`` any bytes-like object (sent without a copy)."""
    body = json.dumps(head or {}).encode()
    data = memoryview(payload).cast("B") if len(payload) else b""
    frame = _HEADER.pack(kind, len(body), len(data)) + body
    if fds:
        sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(frame)
    if len(data):
        sock.sendall(data)


def _exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise Closed("end of stream inside a message")
        got += k
    return buf


def recv(sock: socket.socket) -> Tuple[bytes, dict, bytearray, List[int]]:
    """One message: ``(kind, head, payload, fds)``. Raises :class:`Closed` at end of stream,
    ``ValueError`` on a frame that is not ours."""
    fds: List[int] = []
    msg, anc, _, _ = sock.recvmsg(_HEADER.size, socket.CMSG_SPACE(4 * array.array("i").itemsize))
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
    if not msg:
        raise Closed("end of stream")
    if len(msg) < _HEADER.size:
        msg = bytes(msg) + bytes(_exact(sock, _HEADER.size - len(msg)))
    kind, nbody, npayload = _HEADER.unpack(msg)
    if kind not in KINDS or nbody > _MAX_JSON:
        for fd in fds:
            socket.close(fd)
        raise ValueError(f"not a node reader message (kind {kind!r}, {nbody} bytes of JSON)")
    head = json.loads(bytes(_exact(sock, nbody))) if nbody else {}
    payload = _exact(sock, npayload) if npayload else bytearray()
    return kind, head, payload, fds
