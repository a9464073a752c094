"""Transport faults: the callback server unreachable while results are posted, and clients that reset, trickle,
stall or stop reading.

What must hold: every result posted during a 10 s outage arrives once the server is reachable again, none lost and
none resolved twice; hostile connections neither hang the server nor leak a task, a connection or memory (open
connections, asyncio tasks and sockets return to their baseline, RSS stays bounded), and the server keeps serving
during the attack. Each test counts what it sent and what arrived; times are recorded, and the waits on them are
only hang guards.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from tests.reliability import transport_tasks
from tests.reliability.transport_support import (
    ExecutorDriver,
    ServerThread,
    TcpProxy,
    free_port,
    json_body,
    post,
    record,
    until,
    wait_for,
)
from wove._types import Frame
from wove.backend import BackendCallbackServer, post_event, post_event_async
from wove.errors import ConfigError

pytestmark = pytest.mark.integration

#: Seconds the callback server stays unreachable.
OUTAGE = 10.0
#: Seconds after the drop before counting what gets through: what the proxy forwarded just before it is still
#: being read by the server.
SETTLE = 0.5
#: Seconds a delivery may take, retries included: comfortably past the outage.
DEADLINE = 90.0


# -- (a) the server unreachable for 10 s ----------------------------------------------------------------------------


async def test_results_posted_while_the_server_is_unreachable_all_arrive_once() -> None:
    """``process`` workers post through a proxy; the proxy's listener closes for 10 s (open connections reset)."""
    port = free_port()
    proxy = await TcpProxy(port).start()
    config = {
        "max_workers": 4,
        "callback_port": port,
        "callback_url": f"http://127.0.0.1:{proxy.port}",
        "env": {"WOVE_POST_DEADLINE": str(DEADLINE)},
    }
    driver = await ExecutorDriver.start(config)
    runs: dict[str, int] = {}
    try:
        for n in range(16):
            runs[await driver.submit(transport_tasks.nap_then, seconds=0.4, value=n)] = n

        def started() -> int:
            return sum(any(f["type"] == "task_started" for f in driver.frames.get(run, [])) for run in runs)

        await until(lambda: started() >= 2, 60, "workers started")  # results are about to be posted
        await proxy.drop()
        dropped_at = time.monotonic()
        await asyncio.sleep(SETTLE)  # frames the proxy had passed on before the drop reach the executor
        terminal_before = sum(driver.terminal.values())
        await asyncio.sleep(OUTAGE - SETTLE)
        terminal_during = sum(driver.terminal.values()) - terminal_before
        await proxy.restore()
        restored_at = time.monotonic()
        await until(lambda: all(driver.outcome(run) for run in runs), DEADLINE, "every run resolved after the outage")
        recovered = time.monotonic() - restored_at
        values = {run: driver.outcome(run) for run in runs}
    finally:
        await driver.close()
        await proxy.close()
    kinds = Counter(frame["type"] for frame in values.values() if frame is not None)
    duplicated = sum(count - 1 for count in driver.terminal.values() if count > 1)
    lost = sum(run not in driver.terminal for run in runs)
    assert terminal_during == 0  # nothing got through once the drop had settled: the outage was real
    assert kinds == {"task_result": len(runs)}, kinds
    assert {run: frame["result"] for run, frame in values.items() if frame is not None} == runs
    assert duplicated == 0 and lost == 0
    record(
        "fault: callback server unreachable 10 s (process backend, run URLs, proxy dropped)",
        submitted=len(runs),
        resolved=len(runs) - lost,
        lost=lost,
        duplicated=duplicated,
        terminal_frames_during_outage=terminal_during,
        outage_seconds=round(restored_at - dropped_at, 2),
        seconds_to_last_result_after_restore=round(recovered, 2),
        connections_through_proxy=proxy.accepted,
    )


async def test_results_to_a_restarted_server_on_the_same_port_all_arrive_once() -> None:
    """The listener closes (``stop``) and a new server starts 10 s later on the same port with the same token;
    sync and async clients post to the master URL throughout."""
    token = "reliability-restart-token"
    first = BackendCallbackServer(token=token)
    await first.start()
    url = str(first.callback_url)
    port = int(url.split(":")[2].split("/")[0])
    await first.stop()  # unreachable from here on
    stopped_at = time.monotonic()

    frames = {f"sync-{n}": n for n in range(24)} | {f"async-{n}": 100 + n for n in range(16)}
    failures: list[BaseException] = []

    def post_sync(run_id: str) -> None:
        try:
            post_event(url, {"type": "task_result", "run_id": run_id, "result": frames[run_id]}, timeout=DEADLINE)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=post_sync, args=(run,)) for run in frames if run.startswith("sync")]
    for thread in threads:
        thread.start()
    posting = [
        asyncio.ensure_future(post_event_async(url, {"type": "task_result", "run_id": run, "result": value}))
        for run, value in frames.items()
        if run.startswith("async")
    ]
    await asyncio.sleep(OUTAGE)
    second = BackendCallbackServer(port=port, token=token)
    accepted: list[Frame] = []
    second.deliver_to(accepted.append)
    await second.start()
    restarted_at = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*posting), DEADLINE)
        await until(lambda: not any(thread.is_alive() for thread in threads), DEADLINE, "sync posters finished")
        recovered = time.monotonic() - restarted_at
    finally:
        await second.stop()
    arrived = Counter(frame["run_id"] for frame in accepted)
    assert failures == []
    assert {frame["run_id"]: frame["result"] for frame in accepted} == frames
    assert set(arrived.values()) == {1}
    record(
        "fault: callback server restarted on the same port after 10 s (master URL, sync + async clients)",
        submitted=len(frames),
        resolved=len(arrived),
        lost=len(frames) - len(arrived),
        duplicated=sum(arrived.values()) - len(arrived),
        outage_seconds=round(restarted_at - stopped_at, 2),
        seconds_to_last_result_after_restart=round(recovered, 2),
    )


# -- (b) resets, trickles, stalls and slow readers ------------------------------------------------------------------

IDLE = 1.0
#: Bound on the wait for the server to be back at its baseline (aiohttp lingers up to 10 s on a refused body).
SETTLE_BOUND = 40.0
RESETS = 50
STALLS = 30
TRICKLES = 15
SLOW_READERS = 4
BLOB = 16 << 20


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:  # before connecting, so the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket, bound: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (``True``) or ``bound`` seconds pass (``False``)."""
    sock.settimeout(bound)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        return got, False
    except ConnectionResetError:
        pass
    return got, True


def _status(data: bytes) -> int | None:
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def test_resets_trickles_stalls_and_slow_readers_leave_nothing_behind() -> None:
    with ServerThread(idle_timeout=IDLE) as srv:
        port = srv.port
        victim = srv.open_run("victim")
        blob_run = srv.open_run("blob")
        ref = srv.call(srv.server.put_blob, "blob", b"\x01" * BLOB)
        frame = json_body({"type": "heartbeat", "run_id": "victim", "pad": "x" * 4000})
        head = f"POST {victim} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        for _ in range(20):  # warm the server up before the baseline
            assert post(port, victim, frame).status == 200
        wait_for(lambda: srv.usage().connections == 0, SETTLE_BOUND, "the warm-up connections closed")
        baseline = srv.usage()
        outcomes: dict[str, Counter[str]] = {}
        lock = threading.Lock()

        def note(kind: str, what: str) -> None:
            with lock:
                outcomes.setdefault(kind, Counter())[what] += 1

        def reset_mid_body() -> None:
            sock = _connect(port)
            sock.sendall(head + b"Content-Length: 100000\r\n\r\n" + b"x" * 5000)
            time.sleep(0.05)
            _reset(sock)
            note("reset mid-body", "reset")

        def reset_mid_headers() -> None:
            sock = _connect(port)
            sock.sendall(head[:30])
            time.sleep(0.05)
            _reset(sock)
            note("reset mid-headers", "reset")

        def stall_mid_body() -> None:
            with _connect(port) as sock:
                sock.sendall(head + f"Content-Length: {len(frame)}\r\n\r\n".encode() + frame[: len(frame) // 2])
                data, closed = _read_until_closed(sock, 30)
                note("stopped halfway the body", f"{_status(data)} {'closed' if closed else 'open'}")

        def stall_mid_headers() -> None:
            with _connect(port) as sock:
                sock.sendall(head[:40])
                data, closed = _read_until_closed(sock, 30)
                note("stopped halfway the headers", f"{_status(data)} {'closed' if closed else 'open'}")

        def idle_connection() -> None:
            with _connect(port) as sock:
                data, closed = _read_until_closed(sock, 30)
                note("connected, sent nothing", f"{_status(data)} {'closed' if closed else 'open'}")

        def trickle_valid() -> None:
            body = json_body({"type": "heartbeat", "run_id": "victim", "n": uuid.uuid4().hex})
            with _connect(port) as sock:
                sock.sendall(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
                for start in range(0, len(body), 25):
                    time.sleep(0.1)
                    sock.sendall(body[start : start + 25])
                data, _ = _read_until_closed(sock, 30)
                note("trickled a valid frame", str(_status(data)))

        def trickle_unauthenticated() -> None:
            forged = head.replace(victim.encode(), victim[:-3].encode() + b"AAA")
            with _connect(port) as sock:
                sock.sendall(forged + b"Content-Length: 1000000\r\n\r\n")
                sock.settimeout(0.2)
                data, closed, began = b"", False, time.monotonic()
                while time.monotonic() - began < 30:
                    try:
                        sock.sendall(b"x" * 100)
                        chunk = sock.recv(65536)
                        if not chunk:
                            closed = True
                            break
                        data += chunk
                    except TimeoutError:
                        continue
                    except OSError:
                        closed = True
                        break
                note("trickled a body with a forged credential", f"{_status(data)} {'closed' if closed else 'open'}")

        def slow_reader() -> None:
            sock = _connect(port, receive_buffer=4096)
            sock.sendall(f"GET {blob_run}/blobs/{ref} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            first = sock.recv(1024)
            time.sleep(3)  # the server's writes back up; then the reader vanishes
            _reset(sock)
            note("stopped reading a 16 MiB blob", str(_status(first)))

        attacks: list[tuple[Callable[[], None], int]] = [
            (reset_mid_body, RESETS),
            (reset_mid_headers, RESETS),
            (stall_mid_body, STALLS),
            (stall_mid_headers, STALLS),
            (idle_connection, STALLS),
            (trickle_valid, TRICKLES),
            (trickle_unauthenticated, TRICKLES),
            (slow_reader, SLOW_READERS),
        ]
        threads = [threading.Thread(target=attack) for attack, count in attacks for _ in range(count)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        during = srv.usage()
        serving = post(port, srv.master_path, json_body({"type": "heartbeat", "run_id": "during-the-attack"}))
        for thread in threads:
            thread.join(60)
        attack_seconds = time.monotonic() - began
        assert not any(thread.is_alive() for thread in threads), "an attacking client hung"
        srv.call(srv.server.close_run, "blob")  # frees the blob, as a started run would

        def settled() -> bool:
            now = srv.usage()
            return (now.connections, now.sockets, now.tasks) <= (
                baseline.connections,
                baseline.sockets,
                baseline.tasks,
            )

        settle_seconds = wait_for(settled, SETTLE_BOUND, "connections, sockets and tasks back to their baseline")
        after = srv.usage()
        still = post(port, victim, frame)

    assert serving.status == 200 and still.status == 200
    expected = {
        "reset mid-body": {"reset": RESETS},
        "reset mid-headers": {"reset": RESETS},
        "stopped halfway the body": {"408 closed": STALLS},
        "stopped halfway the headers": {"None closed": STALLS},
        "connected, sent nothing": {"None closed": STALLS},
        "trickled a valid frame": {"200": TRICKLES},
        "trickled a body with a forged credential": {"401 closed": TRICKLES},
        "stopped reading a 16 MiB blob": {"200": SLOW_READERS},
    }
    assert {kind: dict(counts) for kind, counts in outcomes.items()} == expected
    rss_growth = after.rss - baseline.rss
    assert rss_growth < 64 << 20, f"RSS grew by {rss_growth >> 20} MiB"
    record(
        "fault: resets, trickles, stalls, slow readers",
        connections=len(threads),
        outcomes={kind: dict(counts) for kind, counts in outcomes.items()},
        baseline={"tasks": baseline.tasks, "connections": baseline.connections, "sockets": baseline.sockets},
        during={"tasks": during.tasks, "connections": during.connections, "sockets": during.sockets},
        after={"tasks": after.tasks, "connections": after.connections, "sockets": after.sockets},
        rss_baseline_mib=round(baseline.rss / 2**20, 1),
        rss_growth_mib=round(rss_growth / 2**20, 1),
        attack_seconds=round(attack_seconds, 2),
        seconds_to_baseline_after_attack=round(settle_seconds, 2),
        valid_frame_during_attack=serving.status,
        idle_timeout=IDLE,
    )


def test_the_default_server_closes_idle_connections() -> None:
    """Without the fix aiohttp would hold a silent connection for an hour and a stalled body forever."""
    server = BackendCallbackServer()
    assert 0 < server.idle_timeout <= 120
    with pytest.raises(ConfigError, match="idle_timeout"):
        BackendCallbackServer(idle_timeout=0)
