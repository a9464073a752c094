"""The dispatch codec: payloads, their one-line text form, frames and the binary envelope."""

from __future__ import annotations

import json
import pickle
import re
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.backend import backend_tasks
from tests.unit.backend.conftest import run_task
from wove.backend import (
    build_backend_payload,
    build_backend_payload_for_run,
    codec,
    deserialize_frame,
    payload_from_b64,
    payload_to_b64,
    serialize_frame,
)
from wove.errors import PayloadError

PAYLOAD_KEYS = {
    "version",
    "adapter",
    "callback_url",
    "run_id",
    "task_id",
    "task_name",
    "callable_pickle",
    "args_pickle",
    "delivery",
}


def _payload(**kwargs: object) -> dict[str, object]:
    frame = run_task(backend_tasks.add, delivery={"heartbeat_seconds": 3, "retries": 2}, a=1, b=2)
    frame.update(kwargs)
    return build_backend_payload(frame, callback_url="http://127.0.0.1:1/wove/events/x", adapter="celery")


def test_payload_is_json_safe_and_carries_the_frame() -> None:
    payload = _payload()
    assert set(payload) == PAYLOAD_KEYS
    assert json.loads(json.dumps(payload)) == payload
    assert payload["version"] == 1
    assert payload["adapter"] == "celery"
    assert payload["callback_url"] == "http://127.0.0.1:1/wove/events/x"
    assert (payload["run_id"], payload["task_id"], payload["task_name"]) == ("run-1", "task-run-1", "add")
    assert payload["delivery"] == {"heartbeat_seconds": 3, "retries": 2}
    fn = codec.loads(codec.b64decode(payload["callable_pickle"], "callable"), "callable")
    args = codec.loads(codec.b64decode(payload["args_pickle"], "args"), "args")
    assert fn(**args) == 3


def test_payload_pickles_lambdas_by_value() -> None:
    payload = _payload(callable=lambda a, b: a * b)
    fn = pickle.loads(codec.b64decode(payload["callable_pickle"], "callable"))
    assert fn(a=6, b=7) == 42


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "cancel_task"}, "run_task frame"),
        ({"delivery": {"when": object()}}, "not JSON-safe"),
        ({"args": {"lock": threading.Lock()}}, "cannot pickle the arguments"),
    ],
)
def test_payload_refuses_bad_frames(change: dict[str, object], message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        _payload(**change)


def test_payload_refuses_a_frame_without_identity() -> None:
    frame = run_task(backend_tasks.add, a=1, b=2)
    del frame["run_id"]
    with pytest.raises(PayloadError, match="lacks run_id"):
        build_backend_payload(frame, callback_url="http://x/", adapter="a")


class _Registry:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def open_run(self, run_id: str) -> str:
        return f"http://127.0.0.1:1/wove/runs/{run_id}/cred"

    def put_blob(self, run_id: str, data: bytes) -> str:
        ref = str(len(self.blobs) + 1)
        self.blobs[ref] = data
        return ref


def test_payload_for_run_keeps_small_bodies_inline() -> None:
    registry = _Registry()
    frame = run_task(backend_tasks.add, a=1, b=2)
    payload = build_backend_payload_for_run(frame, server=registry, adapter="slurm")
    assert payload["callback_url"] == "http://127.0.0.1:1/wove/runs/run-1/cred"
    assert isinstance(payload["callable_pickle"], str) and isinstance(payload["args_pickle"], str)
    assert registry.blobs == {}


def test_payload_for_run_moves_large_bodies_to_blobs_without_base64() -> None:
    registry = _Registry()
    data = bytes(range(256)) * 4096  # 1 MiB
    payload = build_backend_payload_for_run(
        run_task(backend_tasks.reverse, data=data), server=registry, adapter="slurm", inline_limit=4096
    )
    assert isinstance(payload["callable_pickle"], str)  # small: stays inline
    ref = payload["args_pickle"]
    assert ref == {"ref": "1", "size": len(registry.blobs["1"])}
    assert pickle.loads(registry.blobs["1"]) == {"data": data}
    assert len(payload_to_b64(payload)) < 4096


def test_payload_for_run_with_zero_limit_moves_everything() -> None:
    registry = _Registry()
    payload = build_backend_payload_for_run(
        run_task(backend_tasks.add, a=1, b=2), server=registry, adapter="x", inline_limit=0
    )
    assert isinstance(payload["callable_pickle"], dict) and isinstance(payload["args_pickle"], dict)


# -- one-line text form ------------------------------------------------------------------------------------------------


def test_b64_round_trip_is_one_safe_ascii_line() -> None:
    payload = _payload()
    text = payload_to_b64(payload)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", text)
    assert payload_from_b64(text) == payload
    assert payload_from_b64(f"  {text}\n") == payload


def test_b64_compresses_repetitive_payloads() -> None:
    payload = _payload(args={"a": "x" * 50_000, "b": "y"})
    text = payload_to_b64(payload)
    assert text[0] == "z"
    assert len(text) < len(json.dumps(payload)) / 10
    assert payload_from_b64(text) == payload


def _b64(raw: bytes, tag: str = "j") -> str:
    import base64

    return tag + base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a wove payload"),
        ("hello", "not a wove payload"),
        ("j!!!!", "not valid base64"),
        (_b64(b"\x00garbage", "z"), "not valid zlib"),
        (_b64(b"not json"), "not valid JSON"),
        (_b64(b"[1, 2]"), "is a dict"),
        (_b64(json.dumps({"version": 2}).encode()), "unsupported payload version 2"),
    ],
)
def test_b64_refuses_malformed_text(text: str, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        payload_from_b64(text)


def test_b64_refuses_truncated_compressed_payloads() -> None:
    text = payload_to_b64(_payload(args={"a": "x" * 50_000, "b": "y"}))
    with pytest.raises(PayloadError):
        payload_from_b64(text[: len(text) // 2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"run_id": ""}, "'run_id' must be a non-empty string"),
        ({"callback_url": None}, "'callback_url'"),
        ({"args_pickle": {"nope": 1}}, "'args_pickle' must be base64 text or a"),
        ({"delivery": []}, "'delivery' must be a dict"),
    ],
)
def test_validate_payload_names_the_bad_field(change: dict[str, object], message: str) -> None:
    payload = {**_payload(), **change}
    with pytest.raises(PayloadError, match=message):
        codec.validate_payload(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(delivery=st.dictionaries(st.text(max_size=10), json_values, max_size=5), run_id=st.text(min_size=1))
def test_b64_round_trips_any_json_safe_payload(delivery: dict[str, object], run_id: str) -> None:
    payload = _payload(delivery=delivery, run_id=run_id)
    text = payload_to_b64(payload)
    assert text.isascii() and "\n" not in text and " " not in text
    assert payload_from_b64(text) == payload


# -- frames -----------------------------------------------------------------------------------------------------------


def test_serialize_frame_round_trips_python_values() -> None:
    error = codec.error_info(ValueError("bad"), source="task")
    frame = {"type": "task_error", "run_id": "r", "task_id": "t", "exception": ValueError("bad"), "error": error}
    wire = serialize_frame(frame)
    assert set(wire) == {"type", "run_id", "task_id", "exception_pickle", "error_pickle"}
    assert json.loads(json.dumps(wire)) == wire
    back = deserialize_frame(wire)
    assert isinstance(back["exception"], ValueError) and back["exception"].args == ("bad",)
    assert back["error"] == error

    result = deserialize_frame(serialize_frame({"type": "task_result", "run_id": "r", "result": {"x": [1, 2]}}))
    assert result == {"type": "task_result", "run_id": "r", "result": {"x": [1, 2]}}


def test_serialize_frame_pickles_unimportable_results_with_cloudpickle() -> None:
    frame = {"type": "task_result", "run_id": "r", "result": lambda: 5}
    assert deserialize_frame(serialize_frame(frame))["result"]() == 5


def test_exceptions_that_cannot_travel_are_dropped_and_the_error_dict_kept() -> None:
    try:
        backend_tasks.raise_needs_two()
    except backend_tasks.NeedsTwoArgs as exc:
        rebuilt_fails = exc
    error = codec.error_info(rebuilt_fails, source="task")
    back = deserialize_frame(
        serialize_frame({"type": "task_error", "run_id": "r", "exception": rebuilt_fails, "error": error})
    )
    assert "exception" not in back and back["error"]["message"] == "left/right"

    class Holder(Exception):
        pass

    unpicklable = Holder("x")
    unpicklable.lock = threading.Lock()  # type: ignore[attr-defined]
    wire = serialize_frame({"type": "task_error", "run_id": "r", "exception": unpicklable, "error": error})
    assert "exception_pickle" not in wire and "error_pickle" in wire


def test_error_info_normalises_exceptions() -> None:
    try:
        backend_tasks.flaky()
    except backend_tasks.RetryableError as exc:
        info = codec.error_info(exc, source="task")
    assert info["kind"] == "tests.unit.backend.backend_tasks.RetryableError"
    assert info["message"] == "try again later"
    assert "flaky" in info["traceback"]
    assert info["retryable"] is True and info["source"] == "task"
    assert codec.error_info(KeyError("k"), source="worker")["kind"] == "KeyError"


def test_envelope_round_trips_and_splits_without_unpickling(tmp_path) -> None:
    marker = tmp_path / "unpickled"
    encoded = codec.encode_frame(
        {"type": "task_result", "run_id": "r", "task_id": 1, "result": backend_tasks.Marker(str(marker))}
    )
    assert encoded.content_type == codec.FRAME_CONTENT_TYPE
    body = b"".join(encoded.parts)
    assert len(body) == encoded.size
    header, parts = codec.split_frame(encoded.content_type, body)
    assert header == {"type": "task_result", "run_id": "r", "task_id": 1}
    assert set(parts) == {"result_pickle"} and not marker.exists()
    assert codec.load_frame(header, parts)["result"] == str(marker) and marker.exists()


def test_frames_without_python_values_travel_as_json() -> None:
    content_type, parts, size = codec.encode_frame({"type": "heartbeat", "run_id": "r"})
    assert content_type == codec.JSON_CONTENT_TYPE and json.loads(parts[0]) == {"type": "heartbeat", "run_id": "r"}
    assert len(parts) == 1 and size == len(parts[0])


def test_large_values_are_not_copied_into_the_envelope() -> None:
    data = b"\x07" * (1 << 20)
    encoded = codec.encode_frame({"type": "task_result", "run_id": "r", "result": data})
    assert any(part is data for part in encoded.parts)  # handed over by the pickler as is
    header, parts = codec.split_frame(encoded.content_type, b"".join(encoded.parts))
    assert codec.load_frame(header, parts)["result"] == data


def _envelope(header: dict[str, object], blob: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return blob + raw + len(raw).to_bytes(4, "big") + b"WOVF"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "bad_envelope"),
        (b"xxxxxxxxWOVX", "bad_envelope"),
        (b"{}" + (999).to_bytes(4, "big") + b"WOVF", "bad_envelope"),
        (b"{x" + (2).to_bytes(4, "big") + b"WOVF", "bad_json"),
        (_envelope({"type": "task_result"}), "bad_frame"),
        (_envelope({"type": "task_result", "_parts": {"result_pickle": [0, 99]}}, b"abc"), "bad_envelope"),
        (_envelope({"type": "task_result", "_parts": {"other": [0, 1]}}, b"a"), "bad_envelope"),
        (_envelope({"type": "task_result", "_parts": {"result_pickle": [0, -1]}}, b"a"), "bad_envelope"),
    ],
)
def test_split_frame_refuses_bad_envelopes(body: bytes, reason: str) -> None:
    with pytest.raises(codec.FrameError) as info:
        codec.split_frame(codec.FRAME_CONTENT_TYPE, body)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"type": "run_task", "run_id": "r"}, "unknown_type"),
        ({"type": "nope", "run_id": "r"}, "unknown_type"),
        ({"type": "heartbeat"}, "missing_run_id"),
        ({"type": "heartbeat", "run_id": 5}, "missing_run_id"),
        ({"type": "heartbeat", "run_id": "r", "task_id": [1]}, "bad_frame"),
    ],
)
def test_event_headers_are_validated(header: dict[str, object], reason: str) -> None:
    with pytest.raises(codec.FrameError) as info:
        codec.validate_event_header(header)
    assert info.value.reason == reason


def test_load_frame_requires_the_outcome() -> None:
    with pytest.raises(codec.FrameError, match="no result"):
        codec.load_frame({"type": "task_result", "run_id": "r"}, {})
    with pytest.raises(codec.FrameError, match="no error"):
        codec.load_frame({"type": "task_error", "run_id": "r"}, {})
    with pytest.raises(codec.FrameError) as info:
        codec.load_frame({"type": "task_result", "run_id": "r"}, {"result_pickle": b"not a pickle"})
    assert info.value.reason == "bad_pickle"
    frame = codec.load_frame({"type": "task_error", "run_id": "r"}, {"exception_pickle": pickle.dumps(KeyError("k"))})
    assert frame["error"]["kind"] == "KeyError"  # built from the exception when missing


# -- memoized callable pickles -----------------------------------------------------------------------------------------


def _dynamic_function() -> tuple[object, dict[str, object]]:
    """A function of a module that cannot be imported, so cloudpickle pickles it (and its globals) by value."""
    namespace: dict[str, object] = {"__name__": "wove_test_not_importable", "LIMIT": 1, "SETTINGS": {"k": 1}}
    exec("def reads(x):\n    return x + LIMIT + SETTINGS['k']\n", namespace)
    return namespace["reads"], namespace


def test_a_callable_is_pickled_once_while_its_state_holds() -> None:
    fn, namespace = _dynamic_function()
    first = codec.dumps_callable(fn, "t")
    assert codec.dumps_callable(fn, "t") is first and pickle.loads(first.data)(1) == 3
    namespace["SETTINGS"]["k"] = 100  # type: ignore[index]  # mutated in place: the first pickle is kept
    assert codec.dumps_callable(fn, "t") is first
    namespace["LIMIT"] = 5  # rebound: pickled afresh, with what the objects hold now
    rebound = codec.dumps_callable(fn, "t")
    assert rebound is not first and pickle.loads(rebound.data)(1) == 106


def test_importable_callables_are_pickled_by_reference_once() -> None:
    entry = codec.dumps_callable(backend_tasks.add, "t")
    assert entry.state is None and codec.dumps_callable(backend_tasks.add, "t") is entry


def test_closures_are_memoized_per_function_object_and_dropped_with_it() -> None:
    import gc

    def make(offset: int):
        def add(x: int) -> int:
            return x + offset

        return add

    fn = make(3)
    entry = codec.dumps_callable(fn, "t")
    assert codec.dumps_callable(fn, "t") is entry and pickle.loads(entry.data)(1) == 4
    assert codec.dumps_callable(make(3), "t") is not entry  # another object, another pickle
    count = len(codec._pickled_callables)
    del fn, entry
    gc.collect()
    assert len(codec._pickled_callables) < count


def test_other_callables_are_pickled_every_time() -> None:
    import functools

    part = functools.partial(backend_tasks.add, 1)
    assert codec.dumps_callable(part, "t") is not codec.dumps_callable(part, "t")


def test_plain_arguments_skip_cloudpickle_and_others_do_not() -> None:
    plain = {"a": 1, "b": "x", "c": None, "d": 1.5, "e": b"y"}
    assert codec.dumps_arguments(plain, "args") == pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL)
    tricky = {"f": lambda: 1}
    assert pickle.loads(codec.dumps_arguments(tricky, "args"))["f"]() == 1
