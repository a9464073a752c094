"""Forged, replayed and cross-run frames, guessed credentials, and reading another run's payload.

What must hold: a credential of run A on run B, another server's credential, a guessed or truncated token, a frame
replayed after its run resolved or closed, a frame of a second execution: all refused (401/403/409) before anything
in the body is unpickled (each body carries a tripwire pickle). Credential checks go through
``hmac.compare_digest`` (constant time). A holder of one run's credential reads no other run's payload blobs, and
no endpoint returns a result.
"""

from __future__ import annotations

import hmac
import http.client
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.transport_support import (
    TOKEN_CHARS,
    TRIPS,
    Answer,
    ServerThread,
    Tripwire,
    build_request,
    envelope_body,
    exchange,
    json_body,
    post,
    record,
)
from wove.backend import codec, post_event
from wove.errors import CallbackError

#: Random credentials tried per URL kind.
GUESSES = 400


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    with ServerThread() as server:
        yield server


@pytest.fixture
def tripwire(tmp_path: Path) -> Iterator[str]:
    TRIPS.clear()
    marker = tmp_path / "unpickled"
    yield str(marker)
    assert TRIPS == [], f"a forged body was unpickled: {TRIPS}"
    assert not marker.exists()


def _fresh(srv: ServerThread, name: str) -> tuple[str, str]:
    """Open a run with a unique id; return ``(run_id, path of its run URL)``."""
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"
    return run_id, srv.open_run(run_id)


def _result(run_id: str, value: Any) -> dict[str, Any]:
    return {"type": "task_result", "run_id": run_id, "task_id": "t", "result": value}


def _swap_credential(path: str, credential: str) -> str:
    return path.rsplit("/", 1)[0] + "/" + credential


def _credential(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _get(srv: ServerThread, path: str) -> Answer:
    return exchange(srv.port, build_request("GET", path))


def test_another_runs_credential_and_frame_are_refused_before_unpickling(srv: ServerThread, tripwire: str) -> None:
    run_a, path_a = _fresh(srv, "a")
    run_b, path_b = _fresh(srv, "b")
    before = len(srv.accepted())
    statuses: Counter[tuple[int | None, str]] = Counter()

    def note(answer: Answer) -> Answer:
        statuses[answer.status, str(answer.json().get("error"))] += 1
        return answer

    forged_a = _swap_credential(path_a, _credential(path_b))  # run A's URL, run B's credential
    for body, content_type in [
        (json_body(_result(run_a, Tripwire(tripwire))), "application/json"),
        (envelope_body(_result(run_a, Tripwire(tripwire))), codec.FRAME_CONTENT_TYPE),
    ]:
        assert note(post(srv.port, forged_a, body, content_type)).status == 401
        # B's own valid URL, but a frame that claims run A: refused on the header, before the pickles
        answer = note(post(srv.port, path_b, body, content_type))
        assert (answer.status, answer.json()["error"]) == (403, "run_mismatch")

    # an upload whose parts arrive with B's valid credential, assembling a frame of run A
    envelope = envelope_body(_result(run_a, Tripwire(tripwire)))
    part = note(post(srv.port, f"{path_b}/upload?offset=0&total={len(envelope)}", envelope, "application/octet-stream"))
    assert part.status == 200
    answer = note(post(srv.port, path_b, b"", codec.FRAME_CONTENT_TYPE, **{"X-Wove-Upload": str(len(envelope))}))
    assert (answer.status, answer.json()["error"]) == (403, "run_mismatch")
    assert note(post(srv.port, f"{forged_a}/upload?offset=0&total=3", b"abc", "application/octet-stream")).status == 401

    # the credential another callback server issued for the very same run id
    with ServerThread() as elsewhere:
        foreign = elsewhere.open_run(run_a)
        assert note(post(srv.port, foreign, json_body(_result(run_a, Tripwire(tripwire))))).status == 401
        foreign_master = elsewhere.master_path
    assert note(post(srv.port, foreign_master, json_body(_result(run_a, Tripwire(tripwire))))).status == 401

    assert {run_a, run_b} <= srv.call(lambda: srv.server.pending_runs)
    assert len(srv.accepted()) == before
    record(
        "forgery: cross-run credentials and frames",
        requests=sum(statuses.values()),
        statuses={f"{status} {reason}": n for (status, reason), n in statuses.items()},
        tripwires_fired=len(TRIPS),
        frames_accepted=len(srv.accepted()) - before,
    )


def test_the_tripwire_fires_when_a_body_is_unpickled(srv: ServerThread, tmp_path: Path) -> None:
    """The positive control: the same tripwire body on its own run's URL is unpickled, so the marker works."""
    marker = tmp_path / "unpickled"
    run_id, path = _fresh(srv, "control")
    TRIPS.clear()
    assert post(srv.port, path, json_body(_result(run_id, Tripwire(str(marker))))).status == 200
    assert [str(marker)] == TRIPS and marker.exists()
    TRIPS.clear()


def test_replays_after_resolution_are_refused_before_unpickling(srv: ServerThread, tripwire: str) -> None:
    run_id, path = _fresh(srv, "replay")
    before = len(srv.accepted())
    original = json_body(_result(run_id, "first"))
    assert post(srv.port, path, original).status == 200
    refused: Counter[str] = Counter()
    replays = [
        original,
        json_body(_result(run_id, Tripwire(tripwire))),
        envelope_body(_result(run_id, Tripwire(tripwire))),
        json_body({"type": "heartbeat", "run_id": run_id}),
        json_body({"type": "task_started", "run_id": run_id}),
        json_body({"type": "task_error", "run_id": run_id, "exception": Tripwire(tripwire), "error": {}}),
    ]
    for body in replays * 3:
        content_type = codec.FRAME_CONTENT_TYPE if body.endswith(b"WOVF") else "application/json"
        answer = post(srv.port, path, body, content_type)
        assert (answer.status, answer.json()["error"]) == (403, "run_not_pending")
        refused[f"run URL {answer.status}"] += 1
        answer = post(srv.port, srv.master_path, body, content_type)  # the master URL drops them as duplicates
        assert (answer.status, answer.json()) == (200, {"status": "duplicate"})
        refused["master URL duplicate"] += 1

    # a worker's own client: a replayed terminal frame counts as delivered, a heartbeat is refused
    post_event(srv.server.run_url(run_id), _result(run_id, "again"), timeout=5)
    with pytest.raises(CallbackError) as info:
        post_event(srv.server.run_url(run_id), {"type": "heartbeat", "run_id": run_id}, timeout=5)
    assert (info.value.status, info.value.reason) == (403, "run_not_pending")

    # a run the submitting side abandoned (close_run) refuses its URL the same way
    closed_id, closed_path = _fresh(srv, "abandoned")
    srv.call(srv.server.close_run, closed_id)
    answer = post(srv.port, closed_path, json_body(_result(closed_id, Tripwire(tripwire))))
    assert (answer.status, answer.json()["error"]) == (403, "run_not_pending")

    frames = srv.accepted()[before:]
    assert [frame["result"] for frame in frames if frame.get("run_id") == run_id] == ["first"]
    record(
        "forgery: replays after resolution",
        replays=sum(refused.values()) + 3,
        refused=dict(refused),
        resolved_values=[frame["result"] for frame in frames if frame.get("run_id") == run_id],
        tripwires_fired=len(TRIPS),
    )


def test_a_second_execution_of_a_started_run_is_409_before_unpickling(srv: ServerThread, tripwire: str) -> None:
    run_id, path = _fresh(srv, "execution")
    started = {"type": "task_started", "run_id": run_id, "execution": "first-execution"}
    assert post(srv.port, path, json_body(started)).status == 200
    second = {**_result(run_id, Tripwire(tripwire)), "execution": "second-execution"}
    for body, content_type in [
        (json_body(second), "application/json"),
        (envelope_body(second), codec.FRAME_CONTENT_TYPE),
    ]:
        answer = post(srv.port, path, body, content_type)
        assert (answer.status, answer.json()["error"]) == (409, "run_already_started")
    assert run_id in srv.call(lambda: srv.server.pending_runs)
    assert post(srv.port, path, json_body({**_result(run_id, 1), "execution": "first-execution"})).status == 200


def test_guessed_and_truncated_credentials_are_401(srv: ServerThread, tripwire: str) -> None:
    run_id, path = _fresh(srv, "guess")
    credential = _credential(path)
    body = json_body(_result(run_id, Tripwire(tripwire)))
    guesses: list[tuple[str, str]] = []  # (kind, path)
    for _ in range(GUESSES):
        guesses.append(("random run credential", _swap_credential(path, secrets.token_urlsafe(32))))
        guesses.append(("random master token", f"/wove/events/{secrets.token_urlsafe(32)}"))
    for n in range(len(credential)):
        guesses.append(("truncated", _swap_credential(path, credential[:n])))
        flipped = TOKEN_CHARS[(TOKEN_CHARS.index(credential[n]) + 1) % len(TOKEN_CHARS)]
        guesses.append(("one character off", _swap_credential(path, credential[:n] + flipped + credential[n + 1 :])))
    guesses.append(("extended", _swap_credential(path, credential + "A")))
    guesses.append(("master token as run credential", _swap_credential(path, srv.server.token)))
    guesses.append(("padded base64", _swap_credential(path, credential + "=")))
    token = srv.server.token
    guesses += [("truncated master", f"/wove/events/{token[:n]}") for n in range(1, len(token))]

    seen: Counter[tuple[str, int]] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)  # keep-alive: thousands of requests
    try:
        for kind, guess in guesses:
            conn.request("POST", guess, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            seen[kind, response.status] += 1
    finally:
        conn.close()
    assert {status for _, status in seen} == {401}, seen
    assert run_id in srv.call(lambda: srv.server.pending_runs)
    record(
        "forgery: guessed and truncated credentials",
        guesses=len(guesses),
        statuses={f"{kind}: {status}": n for (kind, status), n in seen.items()},
        tripwires_fired=len(TRIPS),
    )


def test_credential_checks_go_through_compare_digest(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spy on ``hmac.compare_digest`` sees every credential check, and its verdict is the one the server follows."""
    run_id, path = _fresh(srv, "digest")
    pending_forgery = _swap_credential(path, "A" * 43)
    closed_id = f"digest-closed-{uuid.uuid4().hex[:6]}"
    closed_forgery = _swap_credential(srv.run_path(closed_id), "B" * 43)
    calls: list[tuple[bytes, bytes]] = []
    original: Callable[[bytes, bytes], bool] = hmac.compare_digest

    def spy(expected: bytes, given: bytes) -> bool:
        calls.append((expected, given))
        return original(expected, given)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    heartbeat = json_body({"type": "heartbeat", "run_id": run_id})
    checks = {
        "pending run, forged": (pending_forgery, b"A" * 43, 401),
        "closed run, forged": (closed_forgery, b"B" * 43, 401),
        "master, forged": ("/wove/events/" + "C" * 43, b"C" * 43, 401),
        "pending run, valid": (path, _credential(path).encode(), 200),
        "master, valid": (srv.master_path, srv.server.token.encode(), 200),
    }
    for name, (target, given, status) in checks.items():
        calls.clear()
        assert post(srv.port, target, heartbeat).status == status, name
        assert any(call[1] == given for call in calls), f"{name}: credential not compared with compare_digest"

    def always(expected: bytes, given: bytes) -> bool:
        calls.append((expected, given))
        return True

    monkeypatch.setattr(hmac, "compare_digest", always)  # the verdict comes from compare_digest, nothing else
    assert post(srv.port, pending_forgery, heartbeat).status == 200
    monkeypatch.setattr(hmac, "compare_digest", original)
    assert post(srv.port, pending_forgery, heartbeat).status == 401
    record("forgery: constant-time checks", checks=len(checks) + 2, compare_digest_decides=True)


def test_a_run_credential_reads_only_its_own_blobs_and_no_results(srv: ServerThread) -> None:
    run_a, path_a = _fresh(srv, "blob-a")
    run_b, path_b = _fresh(srv, "blob-b")
    secret_a, secret_b = b"payload of A " * 1000, b"payload of B"
    ref_a = srv.call(srv.server.put_blob, run_a, secret_a)
    ref_b = srv.call(srv.server.put_blob, run_b, secret_b)
    statuses: Counter[tuple[str, int | None]] = Counter()

    def fetch(kind: str, path: str) -> Answer:
        answer = _get(srv, path)
        statuses[kind, answer.status] += 1
        assert secret_a not in answer.body or kind == "own", f"{kind} read run A's payload"
        return answer

    assert fetch("own", f"{path_a}/blobs/{ref_a}").body == secret_a  # the positive control
    assert fetch("B's credential on A", f"{_swap_credential(path_a, _credential(path_b))}/blobs/{ref_a}").status == 401
    assert fetch("A's ref on B's URL", f"{path_b}/blobs/{ref_a}").status == 404
    assert fetch("master token on A", f"{_swap_credential(path_a, srv.server.token)}/blobs/{ref_a}").status == 401
    for guess in [*map(str, range(0, 300)), "..", "%2e%2e", f"../{ref_a}", f"..%2F..%2F{run_a}%2F{ref_a}", ""]:
        answer = fetch("guessed ref on B's URL", f"{path_b}/blobs/{guess}")
        assert answer.status == (200 if guess == ref_b else 404), guess
    for method in ("GET", "HEAD", "PUT", "DELETE"):  # results are only ever posted: nothing reads them back
        for target in (path_a, srv.master_path, f"{path_a}/result", f"{path_a}/results/1"):
            answer = exchange(srv.port, build_request(method, target), head=method == "HEAD")
            statuses["read a result", answer.status] += 1
            assert answer.status in (404, 405), (method, target, answer.status)

    post_event(srv.server.run_url(run_b), {"type": "task_started", "run_id": run_b}, timeout=5)
    assert fetch("B after it started", f"{path_b}/blobs/{ref_b}").status == 404  # fetched once, then dropped
    srv.call(srv.server.close_run, run_a)
    assert fetch("A after it closed", f"{path_a}/blobs/{ref_a}").status == 403
    record(
        "forgery: blobs of another run",
        requests=sum(statuses.values()),
        statuses={f"{kind}: {status}": n for (kind, status), n in statuses.items()},
        other_runs_payload_read=0,
    )


def test_paths_keep_their_meaning_behind_odd_encodings(srv: ServerThread, tripwire: str) -> None:
    """Percent-encoding, a proxy prefix or a trailing query do not let a credential of one run reach another."""
    run_a, _ = _fresh(srv, "enc-a")
    _, path_b = _fresh(srv, "enc-b")
    body = json_body(_result(run_a, Tripwire(tripwire)))
    cred_b = _credential(path_b)
    forged = [
        f"/proxy/wove/runs/{run_a}/{cred_b}",
        f"/wove/runs/{run_a}/{cred_b}?run={run_a}",
        f"/wove/runs/{run_a.replace('-', '%2D')}/{cred_b}",
        f"/wove/runs/{run_a}%2F{cred_b}",
        f"/wove/runs/{run_a}/{cred_b}%00",
        f"/wove/runs/{run_a}/..%2F{cred_b}",
        f"//wove/runs/{run_a}/{cred_b}/",
    ]
    statuses = Counter(post(srv.port, target, body).status for target in forged)
    assert set(statuses) <= {401, 404}, statuses
    assert run_a in srv.call(lambda: srv.server.pending_runs)
