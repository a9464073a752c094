"""The dispatch codec: backend payloads, event frames and their wire forms.

A *payload* is the JSON-safe dict an adapter hands its backend: task identity, delivery settings, the callback URL,
and the pickled callable and arguments, each either inline (base64 text) or by reference (``{"ref", "size"}``, a blob
kept on the callback server and fetched by the worker).

A *frame* travels back as one HTTP body, in one of two forms:

* JSON (``application/json``): a :func:`serialize_frame` dict, Python values as base64 ``*_pickle`` strings.
* Envelope (``application/vnd.wove.frame``): raw pickles back to back, then the JSON header, its length as a 4-byte
  big-endian integer, and ``WOVF``. Header key ``_parts`` maps ``result_pickle``/``exception_pickle``/
  ``error_pickle`` to ``[offset, length]``. Large results cross the wire once, with no base64 copy.

Pickling uses cloudpickle (the ``wove[dispatch]`` extra), imported only when needed; values the standard pickler can
handle are pickled by it, so a worker whose task and result are plain never imports cloudpickle.
"""

from __future__ import annotations

import base64
import binascii
import json
import pickle
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

from wove._types import EVENT_TYPES, Frame
from wove.errors import BackendUnavailableError, PayloadError

__all__ = [
    "FRAME_CONTENT_TYPE",
    "INLINE_LIMIT",
    "JSON_CONTENT_TYPE",
    "PAYLOAD_VERSION",
    "Chunks",
    "EncodedFrame",
    "FrameError",
    "RunRegistry",
    "build_backend_payload",
    "build_backend_payload_for_run",
    "deserialize_frame",
    "encode_frame",
    "error_info",
    "load_frame",
    "payload_from_b64",
    "payload_to_b64",
    "serialize_frame",
    "split_frame",
    "validate_event_header",
    "validate_payload",
]

#: Payload layout version; workers refuse any other.
PAYLOAD_VERSION = 1

#: Default bytes of base64 pickles a by-reference payload keeps inline; the rest stays on the callback server.
INLINE_LIMIT = 32 * 1024

#: Largest decompressed payload :func:`payload_from_b64` accepts (guards against zlib bombs).
MAX_PAYLOAD_BYTES = 1 << 30

JSON_CONTENT_TYPE = "application/json"
FRAME_CONTENT_TYPE = "application/vnd.wove.frame"

#: Frame keys that hold Python values and travel pickled as ``<key>_pickle``.
PICKLED_FIELDS = ("result", "exception", "error")
_PICKLE_KEYS = tuple(f"{key}_pickle" for key in PICKLED_FIELDS)
_MAGIC = b"WOVF"
_TRAILER = 8
_PROTOCOL = pickle.HIGHEST_PROTOCOL


class FrameError(PayloadError):
    """A callback body that cannot be decoded; ``reason`` is the short code the server answers with."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class RunRegistry(Protocol):
    """What :func:`build_backend_payload_for_run` needs from a callback server."""

    def open_run(self, run_id: str) -> str: ...

    def put_blob(self, run_id: str, data: bytes) -> str: ...


# -- pickling -------------------------------------------------------------------------------------------------------


def _cloudpickle() -> Any:
    try:
        import cloudpickle
    except ImportError as exc:
        raise BackendUnavailableError(
            "cloudpickle is needed to pickle task callables and values: pip install 'wove[dispatch]'"
        ) from exc
    return cloudpickle


def dumps(value: Any, what: str) -> bytes:
    """Pickle ``value`` with cloudpickle (functions and classes by value when they are not importable)."""
    try:
        return _cloudpickle().dumps(value, protocol=_PROTOCOL)  # type: ignore[no-any-return]
    except BackendUnavailableError:
        raise
    except Exception as exc:
        raise PayloadError(f"cannot pickle {what}: {type(exc).__name__}: {exc}") from exc


class Chunks:
    """A write-only file keeping what the pickler writes as a list of buffers.

    The C pickler hands large ``bytes``/``bytearray`` values (64 KiB and up) to ``write`` as they are, so a big
    result is never copied on its way to the socket; a ``BytesIO`` would copy it and over-allocate by an eighth.
    """

    def __init__(self) -> None:
        self.parts: list[bytes | bytearray | memoryview] = []
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        self.parts.append(data)
        self.size += size
        return size

    def join(self) -> bytes:
        return b"".join(self.parts)


def dump_value(value: Any, out: Chunks, what: str) -> None:
    """Pickle ``value`` into ``out``: the standard pickler first, cloudpickle for what it cannot handle."""
    mark, size = len(out.parts), out.size
    try:
        pickle.dump(value, out, protocol=_PROTOCOL)
        return
    except Exception:
        del out.parts[mark:]
        out.size = size
    try:
        _cloudpickle().dump(value, out, protocol=_PROTOCOL)
    except BackendUnavailableError:
        raise
    except Exception as exc:
        del out.parts[mark:]
        out.size = size
        raise PayloadError(f"cannot pickle {what}: {type(exc).__name__}: {exc}") from exc


def loads(data: bytes | bytearray | memoryview, what: str) -> Any:
    """Unpickle ``data``; failures become :class:`PayloadError` (or ``BackendUnavailableError``: no cloudpickle)."""
    try:
        return pickle.loads(data)
    except ModuleNotFoundError as exc:
        if exc.name == "cloudpickle":
            raise BackendUnavailableError(
                f"cloudpickle is needed to load {what}: pip install 'wove[dispatch]'"
            ) from exc
        raise PayloadError(f"cannot unpickle {what}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise PayloadError(f"cannot unpickle {what}: {type(exc).__name__}: {exc}") from exc


def b64encode(data: bytes | bytearray | memoryview) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64decode(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise FrameError("bad_frame", f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FrameError("bad_base64", f"{what} is not valid base64") from exc


def _json_bytes(value: Mapping[str, Any], what: str) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{what} is not JSON-safe: {exc}") from exc


# -- payloads -------------------------------------------------------------------------------------------------------


def _payload(frame: Mapping[str, Any], callback_url: str, adapter: str, body: Mapping[str, Any]) -> dict[str, Any]:
    delivery = dict(frame.get("delivery") or {})
    _json_bytes(delivery, "the delivery settings")
    return {
        "version": PAYLOAD_VERSION,
        "adapter": adapter,
        "callback_url": callback_url,
        "run_id": frame["run_id"],
        "task_id": frame["task_id"],
        "task_name": frame["task_name"],
        "callable_pickle": body["callable_pickle"],
        "args_pickle": body["args_pickle"],
        "delivery": delivery,
    }


def _pickle_body(frame: Mapping[str, Any]) -> dict[str, bytes]:
    if frame.get("type") != "run_task":
        raise PayloadError(f"a backend payload is built from a run_task frame, not {frame.get('type')!r}")
    missing = [key for key in ("run_id", "task_id", "task_name", "callable") if key not in frame]
    if missing:
        raise PayloadError(f"run_task frame lacks {', '.join(missing)}")
    name = frame["task_name"]
    return {
        "callable_pickle": dumps(frame["callable"], f"the callable of task {name!r}"),
        "args_pickle": dumps(dict(frame.get("args") or {}), f"the arguments of task {name!r}"),
    }


def build_backend_payload(frame: Mapping[str, Any], *, callback_url: str, adapter: str) -> dict[str, Any]:
    """Build the JSON-safe payload that a backend worker executes."""
    body = {key: b64encode(data) for key, data in _pickle_body(frame).items()}
    return _payload(frame, callback_url, adapter, body)


def build_backend_payload_for_run(
    frame: Mapping[str, Any], *, server: RunRegistry, adapter: str, inline_limit: int = INLINE_LIMIT
) -> dict[str, Any]:
    """Open the frame's run on ``server`` and build its payload with the run-scoped callback URL.

    When the callable and arguments together would exceed ``inline_limit`` bytes of base64, the largest of them are
    stored on the server (:meth:`put_blob`) and the payload carries ``{"ref": ..., "size": ...}`` in their place;
    the worker fetches them with its run credential. Blobs are never base64-encoded.
    """
    callback_url = server.open_run(frame["run_id"])
    pickled = _pickle_body(frame)
    inline = sum(_b64_len(data) for data in pickled.values())
    body: dict[str, Any] = {}
    for key, data in sorted(pickled.items(), key=lambda item: -len(item[1])):
        if inline > inline_limit:
            body[key] = {"ref": server.put_blob(frame["run_id"], data), "size": len(data)}
            inline -= _b64_len(data)
        else:
            body[key] = b64encode(data)
    return _payload(frame, callback_url, adapter, body)


def _b64_len(data: bytes) -> int:
    return 4 * ((len(data) + 2) // 3)


def validate_payload(payload: object) -> None:
    """Raise :class:`PayloadError` unless ``payload`` is a version-1 payload this worker can run."""
    if not isinstance(payload, Mapping):
        raise PayloadError(f"a backend payload is a dict, not {type(payload).__name__}")
    version = payload.get("version")
    if version != PAYLOAD_VERSION:
        raise PayloadError(f"unsupported payload version {version!r}; this worker understands {PAYLOAD_VERSION}")
    for key in ("callback_url", "run_id", "task_name"):
        if not isinstance(payload.get(key), str) or not payload[key]:
            raise PayloadError(f"payload field {key!r} must be a non-empty string")
    for key in ("callable_pickle", "args_pickle"):
        value = payload.get(key)
        if not isinstance(value, str) and not (isinstance(value, Mapping) and isinstance(value.get("ref"), str)):
            raise PayloadError(f"payload field {key!r} must be base64 text or a {{'ref': ...}} reference")
    if not isinstance(payload.get("delivery", {}), Mapping):
        raise PayloadError("payload field 'delivery' must be a dict")


def payload_to_b64(payload: Mapping[str, Any]) -> str:
    """Encode a payload as one ASCII line (URL-safe base64, zlib-compressed when that is shorter).

    The first character tells the form: ``z`` compressed, ``j`` plain JSON. The text has no padding, spaces or
    quotes, so it is safe in an environment variable or a command-line argument.
    """
    raw = _json_bytes(payload, "the payload")
    packed = zlib.compress(raw, 6)
    tag, data = (b"z", packed) if len(packed) < len(raw) else (b"j", raw)
    return (tag + base64.urlsafe_b64encode(data).rstrip(b"=")).decode("ascii")


def payload_from_b64(value: str) -> dict[str, Any]:
    """Decode :func:`payload_to_b64` output; raise :class:`PayloadError` when it is not a valid payload."""
    text = value.strip() if isinstance(value, str) else ""
    if not text or text[0] not in "zj":
        raise PayloadError("not a wove payload (expected the text payload_to_b64 produces)")
    try:
        data = base64.b64decode(text[1:] + "=" * (-(len(text) - 1) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError("payload is not valid base64") from exc
    if text[0] == "z":
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(data, MAX_PAYLOAD_BYTES)
        except zlib.error as exc:
            raise PayloadError("payload is not valid zlib data (truncated?)") from exc
        if inflater.unconsumed_tail or not inflater.eof:
            raise PayloadError("payload is truncated or larger than the decompression limit")
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise PayloadError("payload is not valid JSON") from exc
    validate_payload(payload)
    return payload  # type: ignore[no-any-return]


# -- frames ---------------------------------------------------------------------------------------------------------


def error_info(exc: BaseException, *, source: str) -> dict[str, Any]:
    """Normalise an exception into the ``error`` dict of a ``task_error`` frame."""
    import traceback

    kind = type(exc).__qualname__
    if type(exc).__module__ not in ("builtins", "__main__"):
        kind = f"{type(exc).__module__}.{kind}"
    return {
        "kind": kind,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "retryable": bool(getattr(exc, "retryable", False)),
        "source": source,
    }


def serialize_frame(frame: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a Wove event frame into a JSON-safe callback payload."""
    out: dict[str, Any] = {}
    for key, value in frame.items():
        if key not in PICKLED_FIELDS:
            out[key] = value
            continue
        chunks = Chunks()
        try:
            dump_value(value, chunks, f"the {key} of run {frame.get('run_id')!r}")
        except PayloadError:
            if key == "exception":  # the error dict still describes it
                continue
            raise
        out[f"{key}_pickle"] = b64encode(chunks.join())
    return out


def deserialize_frame(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a :func:`serialize_frame` dict back into a frame with Python values."""
    header = dict(payload)
    parts = {key: b64decode(header.pop(key), key) for key in _PICKLE_KEYS if key in header}
    return load_frame(header, parts)


class EncodedFrame(NamedTuple):
    """A frame ready to post: its content type and body, the body as buffers to send back to back."""

    content_type: str
    parts: list[bytes | bytearray | memoryview]
    size: int


def encode_frame(frame: Mapping[str, Any]) -> EncodedFrame:
    """Encode ``frame`` for posting: JSON unless it carries Python values, else the envelope."""
    if not any(key in frame for key in PICKLED_FIELDS):
        raw = _json_bytes(frame, "the frame")
        return EncodedFrame(JSON_CONTENT_TYPE, [raw], len(raw))
    body = Chunks()
    header: dict[str, Any] = {}
    parts: dict[str, list[int]] = {}
    for key, value in frame.items():
        if key not in PICKLED_FIELDS:
            header[key] = value
            continue
        start = body.size
        try:
            dump_value(value, body, f"the {key} of run {frame.get('run_id')!r}")
        except PayloadError:
            if key == "exception":
                continue
            raise
        parts[f"{key}_pickle"] = [start, body.size - start]
    header["_parts"] = parts
    raw = _json_bytes(header, "the frame")
    body.write(raw + len(raw).to_bytes(4, "big") + _MAGIC)
    return EncodedFrame(FRAME_CONTENT_TYPE, body.parts, body.size)


def split_frame(content_type: str, body: bytes | bytearray) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a callback body into its JSON header and raw pickles, without unpickling anything."""
    if content_type == FRAME_CONTENT_TYPE:
        return _split_envelope(body)
    try:
        header = json.loads(body)
    except ValueError as exc:
        raise FrameError("bad_json", "body is not valid JSON") from exc
    if not isinstance(header, dict):
        raise FrameError("bad_frame", "a frame is a JSON object")
    parts = {key: b64decode(header.pop(key), key) for key in _PICKLE_KEYS if key in header}
    return header, parts


def _split_envelope(body: bytes | bytearray) -> tuple[dict[str, Any], dict[str, Any]]:
    size = len(body)
    if size < _TRAILER or body[-4:] != _MAGIC:
        raise FrameError("bad_envelope", "frame envelope lacks its trailer")
    header_len = int.from_bytes(body[-_TRAILER:-4], "big")
    header_at = size - _TRAILER - header_len
    if header_at < 0:
        raise FrameError("bad_envelope", "frame header length exceeds the body")
    try:
        header = json.loads(body[header_at : size - _TRAILER])
    except ValueError as exc:
        raise FrameError("bad_json", "frame header is not valid JSON") from exc
    if not isinstance(header, dict) or not isinstance(header.get("_parts"), dict):
        raise FrameError("bad_frame", "frame header is not an object with '_parts'")
    view = memoryview(body)
    parts: dict[str, Any] = {}
    for key, span in header.pop("_parts").items():
        valid = isinstance(span, list) and len(span) == 2 and all(type(n) is int and n >= 0 for n in span)
        if key not in _PICKLE_KEYS or not valid or span[0] + span[1] > header_at:
            raise FrameError("bad_envelope", f"bad part {key!r}")
        parts[key] = view[span[0] : span[0] + span[1]]
    return header, parts


def validate_event_header(header: Mapping[str, Any]) -> str:
    """Check an event frame header's type and identity fields; return its ``run_id``."""
    kind = header.get("type")
    if kind not in EVENT_TYPES:
        raise FrameError("unknown_type", f"unknown frame type {kind!r}")
    run_id = header.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise FrameError("missing_run_id", "frame has no run_id string")
    task_id = header.get("task_id")
    if task_id is not None and not isinstance(task_id, (str, int)):
        raise FrameError("bad_frame", "task_id must be a string or an integer")
    return run_id


def load_frame(header: dict[str, Any], parts: Mapping[str, Any]) -> Frame:
    """Unpickle a frame's parts into ``header`` and return it.

    An exception that cannot be rebuilt here (say its class needs constructor arguments) is dropped: the ``error``
    dict still describes it and the runtime raises ``RemoteTaskError`` from that.
    """
    frame = header
    run_id = frame.get("run_id")
    for key in PICKLED_FIELDS:
        data = parts.get(f"{key}_pickle")
        if data is None:
            continue
        try:
            frame[key] = loads(data, f"the {key} of run {run_id!r}")
        except (PayloadError, BackendUnavailableError) as exc:
            if key != "exception":
                raise FrameError("bad_pickle", str(exc)) from exc
    kind = frame.get("type")
    if kind == "task_result" and "result" not in frame:
        raise FrameError("bad_frame", "task_result frame has no result")
    if kind == "task_error":
        if "error" not in frame and "exception" in frame:
            frame["error"] = error_info(frame["exception"], source="task")
        if not isinstance(frame.get("error"), dict):
            raise FrameError("bad_frame", "task_error frame has no error dict")
    return frame
