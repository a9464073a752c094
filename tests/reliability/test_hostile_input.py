"""Hostile input: a property-based fuzzer over the callback endpoint and over payload and frame decoding.

What must hold: every answer is a 2xx or a 4xx, never a 5xx or a crash; requests without a valid credential never
get a 2xx; the server keeps serving (a valid frame goes through after each burst); and nothing is unpickled for an
unauthenticated request (every such body carries a tripwire pickle: sent with a wrong, missing, truncated or another
run's credential, or for a closed or never-opened run). Decoding random input raises only wove's own errors
(``PayloadError`` and its ``FrameError``). Each test counts its examples and the statuses seen.
"""

from __future__ import annotations

import base64
import gzip
import json
import pickle
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.transport_support import (
    TOKEN_CHARS,
    TRIPS,
    ServerThread,
    Tripwire,
    build_request,
    envelope_body,
    exchange,
    json_body,
    post,
    record,
)
from wove._types import EVENT_TYPES
from wove.backend import codec, deserialize_frame, payload_from_b64, payload_to_b64
from wove.backend.codec import validate_payload
from wove.errors import PayloadError

#: Examples per test; together well over the 5,000 the suite promises.
UNAUTHENTICATED_EXAMPLES = 1800
AUTHENTICATED_EXAMPLES = 1000
RAW_EXAMPLES = 400
PAYLOAD_EXAMPLES = 900
FRAME_EXAMPLES = 700
VALIDATE_EXAMPLES = 400
#: Examples between two checks that a valid frame still goes through.
CHECK_EVERY = 250

FUZZ = settings(
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@dataclass(frozen=True)
class Run:
    run_id: str
    credential: str

    @property
    def path(self) -> str:
        return f"/wove/runs/{quote(self.run_id, safe='')}/{self.credential}"


@dataclass
class Target:
    """The module's callback server and the runs a request may aim at."""

    srv: ServerThread
    pending: Run  # open, the usual victim
    other: Run  # open, its credential is tried on ``pending``
    closed: Run  # its real credential, but closed
    never: Run  # a credential the server would have issued, for a run never opened
    tripwire: str  # the file a tripwire creates
    checks: int = 0

    @property
    def token(self) -> str:
        return self.srv.server.token

    def credentials(self) -> set[str]:
        return {self.token, self.pending.credential, self.other.credential, self.closed.credential}

    def still_serves(self) -> None:
        """A valid frame on the master URL is accepted and reaches the sink."""
        before = len(self.srv.accepted())
        run_id = f"check-{uuid.uuid4().hex}"
        answer = post(self.srv.port, self.srv.master_path, json_body({"type": "heartbeat", "run_id": run_id}))
        assert (answer.status, answer.json()) == (200, {"status": "accepted"})
        frames = self.srv.accepted()
        assert len(frames) == before + 1 and frames[-1]["run_id"] == run_id
        self.checks += 1


def _run(srv: ServerThread, run_id: str, *, keep_open: bool = True) -> Run:
    path = srv.open_run(run_id) if keep_open else srv.run_path(run_id)
    return Run(run_id, path.rsplit("/", 1)[1])


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    # A small frame limit: a fuzzed upload may announce any total, and its buffer is allocated up front.
    with ServerThread(idle_timeout=0.2, max_frame_size=1 << 20) as srv:
        closed = _run(srv, "closed-run")
        srv.call(srv.server.close_run, "closed-run")
        yield Target(
            srv,
            pending=_run(srv, "victim"),
            other=_run(srv, "other"),
            closed=closed,
            never=_run(srv, "never-opened", keep_open=False),
            tripwire=str(tmp_path_factory.mktemp("tripwire") / "unpickled"),
        )


@pytest.fixture(autouse=True)
def _no_trips(target: Target) -> Iterator[None]:
    TRIPS.clear()
    yield
    assert TRIPS == [], f"a body was unpickled without a valid credential: {TRIPS}"
    assert not Path(target.tripwire).exists()


# -- strategies -----------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
FRAME_KEYS = (
    "type",
    "run_id",
    "task_id",
    "result_pickle",
    "exception_pickle",
    "error_pickle",
    "result",
    "exception",
    "error",
    "execution",
    "at",
    "started_at",
    "host",
    "pid",
    "_parts",
    "submission",
)
CONTENT_TYPES = [
    "application/json",
    codec.FRAME_CONTENT_TYPE,
    "application/json; charset=utf-16",
    "text/plain",
    "application/octet-stream",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "",
    ";;;",
    "application/json; charset=\x7f",
]
ENCODINGS = ["gzip", "deflate", "br", "zstd", "identity", "x-nonsense", "gzip, gzip"]
METHODS = ["POST", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"]
header_names = st.text("abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789!#$%&'*+.^_`|~", min_size=1, max_size=20)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


def deep_json(depth: int) -> bytes:
    return b'{"type":' * depth + b"1" + b"}" * depth


#: Drawn bodies name this run; a test swaps in a fresh run id of the same length (envelope offsets stay valid).
PLACEHOLDER = "fuzz-" + "0" * 32
pickled_plain = st.builds(lambda value: base64.b64encode(pickle.dumps(value)).decode(), json_values)


@st.composite
def _frame_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A frame-shaped JSON object with random keys, values and types; its run id is usually ``PLACEHOLDER``."""
    frame: dict[str, Any] = {}
    frame["type"] = draw(st.sampled_from(sorted(EVENT_TYPES)) | json_values)
    frame["run_id"] = draw(st.just(PLACEHOLDER) | json_values)
    for key in draw(st.lists(st.sampled_from(FRAME_KEYS[2:]), max_size=6, unique=True)):
        frame[key] = draw(
            pickled_plain | st.text(max_size=40) | json_values if key.endswith("_pickle") else json_values
        )
    return frame


frame_dicts = _frame_dicts()
spans = st.lists(st.integers(-5, 2**40) | json_values, max_size=3)
part_names = st.text(max_size=16) | st.sampled_from(["result_pickle", "error_pickle", "exception_pickle"])


@st.composite
def _envelopes(draw: st.DrawFn) -> bytes:
    """A valid envelope of a plain result, then corrupted in one of the ways a broken or hostile sender would."""
    value = draw(json_values | st.binary(max_size=64))
    kind = draw(st.sampled_from(["task_result", "heartbeat", "task_error"]))
    raw = bytearray(envelope_body({"type": kind, "run_id": PLACEHOLDER, "result": value}))
    how = draw(st.sampled_from(["none", "flip", "truncate", "length", "magic", "header", "spans", "junk"]))
    if how == "flip":
        for at in draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=6)):
            raw[at] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate":
        del raw[draw(st.integers(0, len(raw) - 1)) :]
    elif how == "length":
        raw[-8:-4] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    elif how == "magic":
        raw[-4:] = draw(st.binary(min_size=4, max_size=4))
    elif how in ("header", "spans"):
        if how == "header":
            header = draw(frame_dicts)
            if draw(st.booleans()):
                header["_parts"] = draw(json_values)
        else:
            header = {"type": "task_result", "run_id": PLACEHOLDER, "_parts": draw(st.dictionaries(part_names, spans))}
        text = json.dumps(header).encode()
        raw = bytearray(draw(st.binary(max_size=64)) + text + len(text).to_bytes(4, "big") + b"WOVF")
    elif how == "junk":
        raw[: draw(st.integers(0, 16))] = draw(st.binary(max_size=32))
    return bytes(raw)


envelopes = _envelopes()


@st.composite
def _authenticated_bodies(draw: st.DrawFn) -> tuple[bytes, str, dict[str, str]]:
    """``(body, content type, extra headers)`` for a request that carries a valid credential."""
    kind = draw(st.sampled_from(["wrong_types", "envelope", "not_object", "deep", "bad_utf8", "swapped"]))
    headers: dict[str, str] = {}
    if kind == "wrong_types":
        return json.dumps(draw(frame_dicts)).encode(), "application/json", headers
    if kind == "envelope":
        return draw(envelopes), codec.FRAME_CONTENT_TYPE, headers
    if kind == "not_object":
        return json.dumps(draw(json_values)).encode(), "application/json", headers
    if kind == "deep":
        return deep_json(draw(st.integers(500, 200_000))), draw(st.sampled_from(CONTENT_TYPES[:2])), headers
    if kind == "bad_utf8":
        return b'{"type": "heartbeat", "run_id": "\xff\xfe"}', "application/json", headers
    heartbeat = json_body({"type": "heartbeat", "run_id": PLACEHOLDER})
    body = draw(st.just(heartbeat) | envelopes)
    if draw(st.booleans()):
        headers["X-Wove-Upload"] = str(draw(st.integers(-1, 1 << 20)))
    return body, draw(st.sampled_from(CONTENT_TYPES)), headers


authenticated_bodies = _authenticated_bodies()


def unauthenticated_requests(t: Target) -> st.SearchStrategy[tuple[str, str, list[tuple[str, str]], bytes, bool]]:
    """Requests aimed past the credential check: ``(method, target, headers, body, chunked)``."""
    wrong = st.text(TOKEN_CHARS, max_size=60).filter(lambda s: s not in t.credentials())
    victim = t.pending
    run_paths = st.one_of(
        wrong.map(lambda s: (f"/wove/events/{s}", "victim")),
        st.sampled_from([("/wove/events/", "victim"), ("/wove/events", "victim")]),
        st.just((f"/wove/runs/{victim.run_id}/{t.other.credential}", "victim")),  # another run's credential
        st.integers(0, len(victim.credential) - 1).map(
            lambda n: (f"/wove/runs/{victim.run_id}/{victim.credential[:n]}", "victim")  # truncated
        ),
        st.just((f"/wove/runs/{victim.run_id}/{victim.credential}x", "victim")),
        st.just((f"/wove/runs/{victim.run_id}/{victim.credential.swapcase()}", "victim")),
        wrong.map(lambda s: (f"/wove/runs/{victim.run_id}/{s}", "victim")),
        st.just((f"/wove/runs/{victim.run_id}/{t.token}", "victim")),  # the master token is no run credential
        st.just((t.closed.path, t.closed.run_id)),  # closed: refused before unpickling
        st.just((t.never.path, t.never.run_id)),  # never opened
    )
    suffixes = st.sampled_from([""] * 8 + ["/upload?offset=0&total=10", "/blobs/1", "/blobs/../1", "?x=1", "/"])
    prefixes = st.sampled_from([""] * 6 + ["/proxy", "//", "/wove", "/%2e%2e"])
    junk_paths = st.text(max_size=30).map(lambda s: "/" + quote(s, safe="/%?&="))
    methods = st.sampled_from(["POST"] * 24 + METHODS + ["?"] * 3)  # "?": a random token
    random_methods = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8)
    kinds = st.sampled_from(["json", "envelope", "mutated", "random", "wrong_types", "padded"])
    extra_headers = st.lists(st.tuples(header_names, header_values), max_size=3)
    tripwire = Tripwire(t.tripwire)

    @st.composite
    def requests(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]], bytes, bool]:
        path, run_id = draw(run_paths)
        target = draw(prefixes) + path + draw(suffixes) if draw(st.integers(0, 9)) else draw(junk_paths)
        frame_type = draw(st.sampled_from(sorted(EVENT_TYPES)))
        frame = {"type": frame_type, "run_id": run_id, "task_id": "t", "result": tripwire, "exception": tripwire}
        if frame_type == "task_error":
            frame["error"] = {"kind": "X", "message": "m", "traceback": "", "retryable": False, "source": "task"}
        kind = draw(kinds)
        content_type = "application/json"
        if kind == "json":
            body = json_body(frame)
        elif kind == "envelope":
            body, content_type = envelope_body(frame), codec.FRAME_CONTENT_TYPE
        elif kind == "mutated":
            raw = bytearray(json_body(frame) if draw(st.booleans()) else envelope_body(frame))
            for at in draw(st.lists(st.integers(0, len(raw) - 1), max_size=4)):
                raw[at] = draw(st.integers(0, 255))
            body, content_type = bytes(raw), draw(st.sampled_from(CONTENT_TYPES[:2]))
        elif kind == "random":
            body = draw(st.binary(max_size=2048))
        elif kind == "wrong_types":
            body = json.dumps(draw(frame_dicts)).replace(PLACEHOLDER, run_id).encode()
        else:  # a large body: refused on its Content-Length, or before any byte of it is read
            body = json_body({**frame, "pad": "x" * draw(st.sampled_from([70_000, 400_000, 1_100_000]))})
        headers = [("Content-Type", draw(st.sampled_from(CONTENT_TYPES)) if draw(st.booleans()) else content_type)]
        if draw(st.integers(0, 3)) == 0:
            encoding = draw(st.sampled_from(ENCODINGS))
            headers.append(("Content-Encoding", encoding))
            if encoding == "gzip" and draw(st.booleans()):
                body = gzip.compress(body, 1)
            elif encoding == "deflate" and draw(st.booleans()):
                body = zlib.compress(body, 1)
        headers += draw(extra_headers)
        if draw(st.integers(0, 9)) == 0:
            headers.append(("X-Wove-Upload", draw(st.text("0123456789", max_size=12))))
        method = draw(methods)
        return draw(random_methods) if method == "?" else method, target, headers, body, draw(st.booleans())

    return requests()


# -- the callback endpoint ------------------------------------------------------------------------------------------


def test_unauthenticated_requests_never_succeed_never_5xx_and_never_unpickle(target: Target) -> None:
    statuses: Counter[int | None] = Counter()
    reasons: Counter[str] = Counter()
    examples = 0

    @settings(FUZZ, max_examples=UNAUTHENTICATED_EXAMPLES)
    @given(request=unauthenticated_requests(target))
    def attack(request: tuple[str, str, list[tuple[str, str]], bytes, bool]) -> None:
        nonlocal examples
        method, path, headers, body, chunked = request
        answer = exchange(
            target.srv.port, build_request(method, path, headers, body, chunked=chunked), head=method == "HEAD"
        )
        statuses[answer.status] += 1
        reasons[answer.json().get("error") or answer.body[:40].decode(errors="replace")] += 1
        examples += 1
        assert answer.status is not None, "the server closed a well-formed request without an answer"
        assert 400 <= answer.status < 500, f"{method} {path} got {answer.status}: {answer.body[:200]!r}"
        assert not TRIPS
        if examples % CHECK_EVERY == 0:
            target.still_serves()

    attack()
    target.still_serves()
    assert target.srv.call(lambda: "victim" in target.srv.server.pending_runs)  # no forged frame closed it
    record(
        "fuzz: unauthenticated requests",
        examples=examples,
        statuses=dict(statuses),
        reasons=dict(reasons.most_common(12)),
        tripwires_fired=len(TRIPS),
        serving_checks=target.checks,
    )


def test_authenticated_garbage_gets_2xx_or_4xx_and_every_accepted_frame_reaches_the_sink(target: Target) -> None:
    statuses: Counter[int | None] = Counter()
    reasons: Counter[str] = Counter()
    accepted_answers = 0
    sink_before, checks_before = len(target.srv.accepted()), target.checks

    @settings(FUZZ, max_examples=AUTHENTICATED_EXAMPLES)
    @given(request=st.data())
    def attack(request: st.DataObject) -> None:
        nonlocal accepted_answers
        run_id = f"fuzz-{uuid.uuid4().hex}"
        where = request.draw(st.sampled_from(["master", "run", "upload"]))
        body, content_type, headers = request.draw(authenticated_bodies)
        body = body.replace(PLACEHOLDER.encode(), run_id.encode())  # same length: envelope offsets hold
        path = target.srv.master_path if where == "master" else target.srv.open_run(run_id)
        if where == "upload":
            offset = request.draw(st.integers(-3, 1 << 20) | st.text(max_size=8))
            total = request.draw(st.integers(-3, 1 << 31) | st.text(max_size=8))
            path += f"/upload?offset={quote(str(offset))}&total={quote(str(total))}"
            content_type = "application/octet-stream"
        answer = post(target.srv.port, path, body, content_type, **headers)
        statuses[answer.status] += 1
        reasons[str(answer.json().get("error") or answer.json().get("status"))] += 1
        assert answer.status is not None
        assert 200 <= answer.status < 500 and answer.status != 401, f"{answer.status}: {answer.body[:300]!r}"
        if answer.status == 200 and answer.json() == {"status": "accepted"} and where != "upload":
            accepted_answers += 1
        if where != "master":
            target.srv.call(target.srv.server.close_run, run_id)  # as the executor does once a run ends
        if sum(statuses.values()) % CHECK_EVERY == 0:
            target.still_serves()

    attack()
    target.still_serves()
    delivered = len(target.srv.accepted()) - sink_before - (target.checks - checks_before)
    record(
        "fuzz: authenticated garbage",
        examples=sum(statuses.values()),
        statuses=dict(statuses),
        reasons=dict(reasons),
        accepted_answers=accepted_answers,
        frames_delivered=delivered,
    )
    assert delivered == accepted_answers  # no accepted frame lost or delivered twice on its way to the sink


def mutated_raw(t: Target) -> st.SearchStrategy[bytes]:
    """Request templates (tripwire bodies only where the credential is wrong) mangled at the byte level."""
    trip = {"type": "task_result", "run_id": t.pending.run_id, "result": Tripwire(t.tripwire)}
    closed_trip = {**trip, "run_id": t.closed.run_id}
    frame_type = [("Content-Type", codec.FRAME_CONTENT_TYPE)]
    templates = [
        build_request("POST", f"/wove/runs/{t.pending.run_id}/{t.other.credential}", [], json_body(trip)),
        build_request("POST", "/wove/events/guessed", frame_type, envelope_body(trip)),
        build_request("POST", t.closed.path, [], json_body(closed_trip), chunked=True),
        build_request("GET", f"{t.pending.path}x/blobs/1", []),
        build_request("POST", t.pending.path, [], json_body({"type": "heartbeat", "run_id": t.pending.run_id})),
    ]
    lines = st.sampled_from([b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b"Host: x\r\n"])
    inserts = st.binary(min_size=1, max_size=16) | st.sampled_from([b"\r\n", b"\n", b"\x00", b":"])
    hows = st.sampled_from(["flip", "delete", "insert", "crlf", "truncate", "duplicate_line", "huge_line"])

    @st.composite
    def mangled(draw: st.DrawFn) -> bytes:
        raw = bytearray(draw(st.sampled_from(templates)))
        for _ in range(draw(st.integers(1, 4))):
            how = draw(hows)
            at = draw(st.integers(0, max(len(raw) - 1, 0)))
            if how == "flip" and raw:
                raw[at] = draw(st.integers(0, 255))
            elif how == "delete":
                del raw[at : at + draw(st.integers(1, 8))]
            elif how == "insert":
                raw[at:at] = draw(inserts)
            elif how == "crlf":
                raw = bytearray(raw.replace(b"\r\n", b"\n", draw(st.integers(1, 6))))
            elif how == "truncate":
                del raw[at:]
            elif how == "duplicate_line":
                raw[at:at] = draw(lines)
            else:
                raw[at:at] = b"X" * draw(st.integers(8_000, 70_000))
        return bytes(raw)

    return mangled()


def test_mangled_http_never_5xx_and_never_unpickles(target: Target) -> None:
    statuses: Counter[int | None] = Counter()

    @settings(FUZZ, max_examples=RAW_EXAMPLES)
    @given(data=mutated_raw(target))
    def attack(data: bytes) -> None:
        answer = exchange(target.srv.port, data, timeout=5.0)
        statuses[answer.status] += 1
        assert answer.status is None or answer.status < 500, f"{answer.status}: {answer.body[:300]!r}"
        assert not TRIPS

    attack()
    target.still_serves()
    record(
        "fuzz: mangled raw HTTP",
        examples=sum(statuses.values()),
        statuses={str(k): v for k, v in statuses.items()},
        tripwires_fired=len(TRIPS),
    )


# -- payload and frame decoding -------------------------------------------------------------------------------------


def _payload() -> dict[str, Any]:
    return {
        "version": 1,
        "adapter": "process",
        "callback_url": "http://127.0.0.1:1/wove/runs/r/c",
        "run_id": "r",
        "task_id": "t",
        "task_name": "task",
        "callable_pickle": base64.b64encode(pickle.dumps(len)).decode(),
        "args_pickle": {"ref": "1", "size": 10},
        "delivery": {"heartbeat_seconds": 3},
    }


@st.composite
def payload_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["random", "mutated", "json", "zlib_junk", "deep", "swapped_tag"]))
    if kind == "random":
        return draw(st.text(max_size=200))
    if kind == "json":
        data = json.dumps(
            draw(
                json_values
                | frame_dicts
                | st.fixed_dictionaries({}, optional={k: st.just(v) for k, v in _payload().items()})
            )
        ).encode()
        return "j" + base64.urlsafe_b64encode(data).decode().rstrip("=")
    if kind == "zlib_junk":
        return "z" + base64.urlsafe_b64encode(draw(st.binary(max_size=100))).decode().rstrip("=")
    if kind == "deep":
        data = zlib.compress(b"[" * draw(st.integers(1000, 300_000)))
        return "z" + base64.urlsafe_b64encode(data).decode().rstrip("=")
    text = payload_to_b64(_payload())
    if kind == "swapped_tag":
        return ("j" if text[0] == "z" else "z") + text[1:]
    chars = list(text)
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(chars) - 1))
        how = draw(st.sampled_from(["set", "delete", "truncate"]))
        if how == "set":
            chars[at] = draw(st.characters())
        elif how == "delete":
            del chars[at]
        else:
            del chars[at:]
        if not chars:
            break
    return "".join(chars)


def test_payload_decoding_raises_only_payload_errors() -> None:
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=PAYLOAD_EXAMPLES)
    @given(text=payload_texts())
    def decode(text: str) -> None:
        try:
            payload = payload_from_b64(text)
        except PayloadError:
            outcomes["PayloadError"] += 1
            return
        validate_payload(payload)
        outcomes["decoded"] += 1

    decode()
    record("fuzz: payload_from_b64", examples=sum(outcomes.values()), outcomes=dict(outcomes))
    assert outcomes["PayloadError"] > 0


def test_validate_payload_raises_only_payload_errors() -> None:
    outcomes: Counter[str] = Counter()
    fields = st.fixed_dictionaries({}, optional={key: json_values for key in _payload()})

    @settings(FUZZ, max_examples=VALIDATE_EXAMPLES)
    @given(value=json_values | fields | st.builds(lambda extra: {**_payload(), **extra}, fields))
    def validate(value: Any) -> None:
        try:
            validate_payload(value)
        except PayloadError:
            outcomes["PayloadError"] += 1
        else:
            outcomes["valid"] += 1

    validate()
    record("fuzz: validate_payload", examples=sum(outcomes.values()), outcomes=dict(outcomes))


@st.composite
def frame_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["random", "json", "envelope", "deep"]))
    if kind == "random":
        return draw(st.sampled_from(CONTENT_TYPES)), draw(st.binary(max_size=512))
    if kind == "json":
        return "application/json", json.dumps(draw(frame_dicts | json_values)).encode()
    if kind == "deep":
        return draw(st.sampled_from(CONTENT_TYPES[:2])), deep_json(draw(st.integers(1000, 100_000)))
    return codec.FRAME_CONTENT_TYPE, draw(envelopes)


def test_frame_decoding_raises_only_frame_errors() -> None:
    """The server's decoding path, in process: split, validate the header, unpickle (plain values only)."""
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=FRAME_EXAMPLES)
    @given(case=frame_bodies() | frame_dicts)
    def decode(case: tuple[str, bytes] | dict[str, Any]) -> None:
        try:
            if isinstance(case, dict):  # the JSON form already parsed: deserialize_frame
                deserialize_frame(case)
            else:
                header, parts = codec.split_frame(*case)
                codec.validate_event_header(header)
                codec.load_frame(header, parts)
            outcomes["decoded"] += 1
        except codec.FrameError as exc:
            outcomes[exc.reason] += 1

    decode()
    record("fuzz: frame decoding", examples=FRAME_EXAMPLES, outcomes=dict(outcomes))
    assert outcomes["decoded"] > 0 and outcomes["bad_envelope"] > 0


# -- regressions found by the fuzzer --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"type": [1], "run_id": "r"}', "unknown_type"),  # an unhashable type was a TypeError: 500
        (b'{"type": {"a": 1}, "run_id": "r"}', "unknown_type"),
        (b"[" * 100_000, "bad_json"),  # RecursionError in the JSON decoder: 500
        (deep_json(50_000), "bad_json"),
        (b'{"type": "task_error", "run_id": "r", "exception": 5}', "bad_frame"),  # error_info(5): 500
    ],
)
def test_fuzzer_findings_are_400_now(target: Target, body: bytes, reason: str) -> None:
    answer = post(target.srv.port, target.srv.master_path, body)
    assert (answer.status, answer.json().get("error")) == (400, reason)
    deep = zlib.compress(b"[" * 100_000)
    with pytest.raises(PayloadError, match="not valid JSON"):
        payload_from_b64("z" + base64.urlsafe_b64encode(deep).decode().rstrip("="))
