"""The dispatch codec: backend payloads, event frames and their wire forms.

A *payload* is the JSON-safe dict an adapter hands its backend: task identity, delivery settings, the callback URL,
and the pickled callable and arguments, each either inline (base64 text) or by reference (``{"ref", "size"}``, a blob
kept on the callback server and fetched by the worker). An optional ``trace_context`` (W3C ``traceparent`` and
``tracestate``) is added only when the weave ran inside an OpenTelemetry span (:mod:`wove.tracing`).

A *frame* travels back as one HTTP body, in one of two forms:

* JSON (``application/json``): a :func:`serialize_frame` dict, Python values as base64 ``*_pickle`` strings.
* Envelope (``application/vnd.wove.frame``): raw pickles back to back, then the JSON header, its length as a 4-byte
  big-endian integer, and ``WOVF``. Header key ``_parts`` maps ``result_pickle``/``exception_pickle``/
  ``error_pickle`` to ``[offset, length]``. Large results cross the wire once, with no base64 copy.

Pickling uses cloudpickle (the ``wove[dispatch]`` extra), imported only when needed; values the standard pickler can
handle are pickled by it, so a worker whose task and result are plain never imports cloudpickle.
"""

from __future__ import annotations

import binascii
import functools
import json
import operator
import sys
import weakref
import zlib
from collections.abc import Mapping
from types import CodeType, FunctionType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    import pickle
else:
    try:  # the C pickler that pickle.py re-exports: pickle.py loads struct and more (a cold worker's ~1 ms)
        import _pickle as pickle
    except ImportError:  # pragma: no cover - not CPython
        import pickle

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
    "dumps_arguments",
    "dumps_callable",
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
_PROTOCOL = 5  # pickle.HIGHEST_PROTOCOL (since Python 3.8; the C pickler does not export it)


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


class _Pickled:
    """A pickle, its base64 text once needed, and for a memoized callable the state it was taken from."""

    __slots__ = ("data", "names", "state", "text")

    def __init__(self, data: bytes, state: tuple[Any, ...] | None = (), names: tuple[str, ...] = ()) -> None:
        self.data = data
        self.state = state  # None: a callable pickled by reference, which carries no state
        self.names = names  # the global names a function's code mentions
        self.text: str | None = None


_MISSING = object()
#: id(callable) -> (weak reference to it, its last pickle); an entry goes with its callable.
_pickled_callables: dict[int, tuple[weakref.ref[Any], _Pickled]] = {}
#: Code object -> names it (or any code nested in it) may read as globals.
_code_names: weakref.WeakKeyDictionary[CodeType, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _global_names(code: CodeType) -> tuple[str, ...]:
    names = _code_names.get(code)
    if names is None:
        found = dict.fromkeys(code.co_names)
        for const in code.co_consts:
            if isinstance(const, CodeType):
                found.update(dict.fromkeys(_global_names(const)))
        names = _code_names[code] = tuple(found)
    return names


def _function_state(fn: FunctionType, names: tuple[str, ...]) -> tuple[Any, ...]:
    """What cloudpickle captures when it pickles ``fn`` by value, by identity: code, defaults, closure cells, and
    the current binding of every global name the code mentions."""
    state: list[Any] = [fn.__code__, fn.__defaults__, fn.__kwdefaults__]
    for cell in fn.__closure__ or ():
        try:
            state.append(cell.cell_contents)
        except ValueError:  # an empty cell
            state.append(_MISSING)
    get = fn.__globals__.get
    state.extend([get(name, _MISSING) for name in names])
    return tuple(state)


def _same_state(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    return len(old) == len(new) and all(map(operator.is_, old, new))


def _forget_callable(key: int, ref: weakref.ref[Any]) -> None:
    item = _pickled_callables.get(key)
    if item is not None and item[0] is ref:
        del _pickled_callables[key]


def dumps_callable(fn: Any, what: str) -> _Pickled:
    """Pickle a task callable, reusing the pickle of an earlier run of the same callable object when it still holds.

    A mapped task submits one callable once per item; pickling it each time (by value, for a function defined in a
    weave block or in ``__main__``) costs tens of microseconds. The pickle is kept per function or class object and
    reused:

    * always, when cloudpickle pickles it by reference (an importable name carries no state);
    * for a function pickled by value, while its code, defaults, closure cells and the objects bound to the global
      names it mentions are *the same objects* as when it was pickled. Rebinding such a global (``LIMIT = 5``) or a
      closure variable makes the next run pickle afresh; mutating one of those objects in place (``CONFIG["k"] = 1``)
      does not, so later runs see the object as it was at the first pickle (Ray and Dask likewise ship a function's
      state once).

    Other callables (bound methods, ``functools.partial``, callable instances, classes pickled by value) are pickled
    every time.
    """
    is_function = isinstance(fn, FunctionType)
    if not is_function and not isinstance(fn, type):
        return _Pickled(dumps(fn, what))
    key = id(fn)
    item = _pickled_callables.get(key)
    alive: Any = item[0]() if item is not None else None
    if item is not None and alive is not None and id(alive) == key:  # the very callable (ids of live objects differ)
        entry = item[1]
        if entry.state is None:
            return entry
        if is_function and fn.__code__ is entry.state[0] and _same_state(entry.state, _function_state(fn, entry.names)):
            return entry
    names = _global_names(fn.__code__) if is_function else ()
    state = _function_state(fn, names) if is_function else None
    data = dumps(fn, what)
    if _by_reference(fn):
        state = None
    elif state is None:  # a class pickled by value: its namespace may change at any time
        return _Pickled(data)
    entry = _Pickled(data, state, names)
    _pickled_callables[key] = (weakref.ref(fn, functools.partial(_forget_callable, key)), entry)
    return entry


#: Argument values of these exact types pickle the same with the standard pickler as with cloudpickle.
_PLAIN_TYPES = frozenset({int, float, complex, str, bytes, bool, type(None)})


def dumps_arguments(args: dict[str, Any], what: str) -> bytes:
    """Pickle a task's keyword arguments: the standard pickler for plain values (no cloudpickle set-up), else
    cloudpickle (a value of a class defined in ``__main__`` must travel by value)."""
    if all(type(value) in _PLAIN_TYPES for value in args.values()):
        return pickle.dumps(args, protocol=_PROTOCOL)
    return dumps(args, what)


def _by_reference(fn: Any) -> bool:
    """Whether cloudpickle pickles ``fn`` by reference (module and name), as it does for importable objects."""
    check = getattr(sys.modules.get("cloudpickle.cloudpickle"), "_should_pickle_by_reference", None)
    if check is None:
        return False
    try:
        return bool(check(fn))
    except Exception:
        return False


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


# base64 through binascii directly: the base64 module (and the struct module it loads) stays out of a cold worker.
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")

if sys.version_info >= (3, 11):

    def _a2b_strict(data: bytes) -> bytes:
        """Decode base64, refusing anything but the alphabet and correct padding (``binascii.Error``)."""
        return binascii.a2b_base64(data, strict_mode=True)

else:  # pragma: no cover - Python 3.10

    def _a2b_strict(data: bytes) -> bytes:
        import re

        if not re.fullmatch(rb"[A-Za-z0-9+/]*={0,2}", data):
            raise binascii.Error("Non-base64 digit found")
        return binascii.a2b_base64(data)


def b64encode(data: bytes | bytearray | memoryview) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64decode(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise FrameError("bad_frame", f"{what} must be a base64 string")
    try:
        return _a2b_strict(text.encode("ascii"))
    except (binascii.Error, ValueError) as exc:
        raise FrameError("bad_base64", f"{what} is not valid base64") from exc


#: One encoder for every compact dump (``json.dumps`` with options builds a new encoder per call).
_encode_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_decode_json = json.JSONDecoder().decode


def _loads(data: bytes | bytearray | memoryview) -> Any:
    """Parse UTF-8 JSON (``ValueError`` when it is not, or nests too deeply); skips ``json.loads``' encoding
    detection."""
    try:
        return _decode_json(str(data, "utf-8"))
    except RecursionError:  # a hostile body like "[[[[...": the decoder recurses once per level
        raise ValueError("JSON nests too deeply") from None


def _json_bytes(value: Mapping[str, Any], what: str) -> bytes:
    try:
        return _encode_json(value).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{what} is not JSON-safe: {exc}") from exc


# -- payloads -------------------------------------------------------------------------------------------------------


#: Delivery settings already found JSON-safe, as frozensets of (key, type, value): every run of a task has the same.
_safe_deliveries: set[frozenset[tuple[Any, ...]]] = set()


def _check_delivery(delivery: dict[str, Any]) -> None:
    try:
        key: frozenset[tuple[Any, ...]] | None = frozenset((k, type(v), v) for k, v in delivery.items())
    except TypeError:  # an unhashable value
        key = None
    if key is not None and key in _safe_deliveries:
        return
    _json_bytes(delivery, "the delivery settings")
    if key is not None:
        if len(_safe_deliveries) >= 256:
            _safe_deliveries.clear()
        _safe_deliveries.add(key)


def _payload(frame: Mapping[str, Any], callback_url: str, adapter: str, body: Mapping[str, Any]) -> dict[str, Any]:
    delivery = dict(frame.get("delivery") or {})
    _check_delivery(delivery)
    payload = {
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
    trace_context = frame.get("trace_context")
    if trace_context:  # only when a span was active in the weave (see wove.tracing)
        payload["trace_context"] = {str(key): str(value) for key, value in trace_context.items()}
    return payload


def _pickle_body(frame: Mapping[str, Any]) -> dict[str, _Pickled]:
    if frame.get("type") != "run_task":
        raise PayloadError(f"a backend payload is built from a run_task frame, not {frame.get('type')!r}")
    missing = [key for key in ("run_id", "task_id", "task_name", "callable") if key not in frame]
    if missing:
        raise PayloadError(f"run_task frame lacks {', '.join(missing)}")
    name = frame["task_name"]
    return {
        "callable_pickle": dumps_callable(frame["callable"], f"the callable of task {name!r}"),
        "args_pickle": _Pickled(dumps_arguments(dict(frame.get("args") or {}), f"the arguments of task {name!r}")),
    }


def _text(pickled: _Pickled) -> str:
    """The base64 text of a pickle, computed once per (memoized) pickle."""
    if pickled.text is None:
        pickled.text = b64encode(pickled.data)
    return pickled.text


def build_backend_payload(frame: Mapping[str, Any], *, callback_url: str, adapter: str) -> dict[str, Any]:
    """Build the JSON-safe payload that a backend worker executes."""
    body = {key: _text(pickled) for key, pickled in _pickle_body(frame).items()}
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
    inline = sum(_b64_len(item.data) for item in pickled.values())
    body: dict[str, Any] = {}
    for key, item in sorted(pickled.items(), key=lambda pair: -len(pair[1].data)):
        if inline > inline_limit:
            body[key] = {"ref": server.put_blob(frame["run_id"], item.data), "size": len(item.data)}
            inline -= _b64_len(item.data)
        else:
            body[key] = _text(item)
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
    if not isinstance(payload.get("callback_socket", ""), str):
        raise PayloadError("payload field 'callback_socket' must be the path of a Unix socket")


def payload_to_b64(payload: Mapping[str, Any]) -> str:
    """Encode a payload as one ASCII line (URL-safe base64, zlib-compressed when that is shorter).

    The first character tells the form: ``z`` compressed, ``j`` plain JSON. The text has no padding, spaces or
    quotes, so it is safe in an environment variable or a command-line argument.
    """
    raw = _json_bytes(payload, "the payload")
    packed = zlib.compress(raw, 6)
    tag, data = (b"z", packed) if len(packed) < len(raw) else (b"j", raw)
    return (tag + binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=")).decode("ascii")


def payload_from_b64(value: str) -> dict[str, Any]:
    """Decode :func:`payload_to_b64` output; raise :class:`PayloadError` when it is not a valid payload."""
    text = value.strip() if isinstance(value, str) else ""
    if not text or text[0] not in "zj":
        raise PayloadError("not a wove payload (expected the text payload_to_b64 produces)")
    try:
        padded = text[1:] + "=" * (-(len(text) - 1) % 4)
        data = _a2b_strict(padded.encode("ascii").translate(_FROM_URLSAFE))
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
    except (ValueError, RecursionError) as exc:
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
        header = _loads(body)
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
        header = _loads(memoryview(body)[header_at : size - _TRAILER])
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
    if not isinstance(kind, str) or kind not in EVENT_TYPES:  # a list or dict is unhashable
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
        if "error" not in frame and isinstance(frame.get("exception"), BaseException):
            frame["error"] = error_info(frame["exception"], source="task")
        if not isinstance(frame.get("error"), dict):
            raise FrameError("bad_frame", "task_error frame has no error dict")
    return frame
