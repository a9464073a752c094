"""Several event frames in one callback request: the body of ``POST <base>/wove/batch``.

A worker holding the outcomes of several short runs (:mod:`wove.backend.outbox`) sends them in one request instead of
one request each. Every entry is a frame exactly as it would be posted on its own, with the path it would be posted
to: its run's URL path, which carries that run's credential. The server checks each entry's credential on its own
and refuses a bad one before anything in it is unpickled, so a batch grants nothing a single post does not.

Layout (``application/vnd.wove.batch``): for each entry, one ASCII line ``<path> <content type> <length>\\n``, then
``length`` bytes of the frame's body. The answer is a JSON list with one object per entry, in order:
``{"status": "accepted"}``, ``{"status": "duplicate"}``, or ``{"code": <HTTP status>, "error": <reason>}``.
"""

from __future__ import annotations

from collections.abc import Sequence

from wove.backend.codec import EncodedFrame, FrameError

__all__ = ["BATCH_CONTENT_TYPE", "BATCH_PATH", "MAX_ENTRIES", "batch_path", "encode_batch", "split_batch"]

BATCH_CONTENT_TYPE = "application/vnd.wove.batch"
#: The batch endpoint, under the server's base URL.
BATCH_PATH = "/wove/batch"
#: Longest entry line the server reads (a path with a run id and a credential, a content type, a length).
MAX_LINE = 4096
#: Most entries one batch may hold: the server takes them one after another on its event loop, so a batch of
#: thousands of tiny (or forged) entries would hold the loop for too long. Clients send larger sets in several.
MAX_ENTRIES = 256


def batch_path(run_path: str) -> str:
    """The batch endpoint's path on the server whose run URL has the path ``run_path``."""
    base, found, _ = run_path.rpartition("/wove/runs/")
    if not found:
        raise ValueError(f"{run_path!r} is not the path of a run URL")
    return base + BATCH_PATH


def encode_batch(entries: Sequence[tuple[str, EncodedFrame]]) -> EncodedFrame:
    """One body for frames posted to their paths: ``[(path, encoded frame), ...]``."""
    parts: list[bytes | bytearray | memoryview] = []
    size = 0
    for path, encoded in entries:
        line = f"{path} {encoded.content_type} {encoded.size}\n".encode("ascii")
        parts.append(line)
        parts.extend(encoded.parts)
        size += len(line) + encoded.size
    return EncodedFrame(BATCH_CONTENT_TYPE, parts, size)


def split_batch(body: bytes | bytearray) -> list[tuple[str, str, bytes | bytearray]]:
    """The entries of a batch body, ``[(path, content type, body), ...]``; :class:`FrameError` when malformed."""
    entries: list[tuple[str, str, bytes | bytearray]] = []
    at = 0
    while at < len(body):
        end = body.find(b"\n", at, at + MAX_LINE)
        if end < 0:
            raise FrameError("bad_batch", f"entry {len(entries)} has no header line")
        fields = bytes(body[at:end]).split(b" ")
        if len(fields) != 3 or not fields[2].isdigit():
            raise FrameError("bad_batch", f"entry {len(entries)}: expected '<path> <content type> <length>'")
        length = int(fields[2])
        start = end + 1
        if start + length > len(body):
            raise FrameError("bad_batch", f"entry {len(entries)} is longer than the body")
        try:
            path, content_type = fields[0].decode("ascii"), fields[1].decode("ascii")
        except UnicodeDecodeError:
            raise FrameError("bad_batch", f"entry {len(entries)}: header line is not ASCII") from None
        entries.append((path, content_type, body[start : start + length]))
        if len(entries) > MAX_ENTRIES:
            raise FrameError("bad_batch", f"a batch holds at most {MAX_ENTRIES} frames")
        at = start + length
    if not entries:
        raise FrameError("bad_batch", "a batch holds at least one frame")
    return entries
