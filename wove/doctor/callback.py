"""Whether workers can reach the callback URL, asked before the ping: wove's callback server answers a GET of its
events path with 405, which tells it apart from a closed port and from some other server at that address.

Workers of the ``process`` backend run on this machine, so the question goes to a process started as they are (same
interpreter, same ``env``); for every other backend it can only be asked from here, where a failure is strong
evidence (and the ping settles it).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["LOOPBACK", "SUGGESTED_PORT", "callback_fix", "probe_from_child", "probe_here"]

#: Port suggested for a fixed callback server when the configuration has none.
SUGGESTED_PORT = 8765
#: Host names only a process on the same machine reaches.
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

#: Run in a worker process of the ``process`` backend: exit 0 when the URL answers as wove's callback server does to
#: a GET of its events path (405), 1 otherwise, printing why.
_CHILD_PROBE = """
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
except urllib.error.HTTPError as exc:
    sys.exit(0 if exc.code == 405 else f"answered HTTP {exc.code}, not as wove's callback server")
except Exception as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
sys.exit("answered 200, not as wove's callback server")
"""


async def probe_here(url: str, timeout: float) -> str | None:
    """GET ``url`` (a callback server's events path) from this process; None when wove's server answered, else why
    not."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=min(timeout, 10))) as session,
            session.get(url) as response,
        ):
            if response.status == 405:
                return None
            return f"answered HTTP {response.status}, not as wove's callback server"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def probe_from_child(python: str, env: Mapping[str, str], url: str, timeout: float) -> str | None:
    """As :func:`probe_here`, from a child process running ``python`` with ``env`` added to this environment."""
    try:
        child = await asyncio.create_subprocess_exec(
            python,
            "-c",
            _CHILD_PROBE,
            url,
            str(min(timeout, 10)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
        )
    except OSError as exc:
        return f"cannot start {python}: {exc}"
    try:
        _, err = await asyncio.wait_for(child.communicate(), timeout + 5)
    except asyncio.TimeoutError:
        child.kill()
        await child.wait()
        return f"the probe did not finish within {timeout:g}s"
    if child.returncode == 0:
        return None
    return err.decode(errors="replace").strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}"


def callback_fix(base: str, config: Mapping[str, Any], backend: str | None = None) -> str:
    """What to change when workers cannot reach ``base``: a concrete ``callback_url`` (this host's name and a fixed
    port), and the listening address when the server listens on loopback only."""
    if backend == "process":
        if config.get("callback_url"):
            return "remove executor_config['callback_url']: the process backend's workers run on this machine"
        return "check that nothing on this machine (a firewall, a proxy in $HTTP_PROXY) blocks loopback connections"
    parts = urlsplit(base)
    port = config.get("callback_port") or SUGGESTED_PORT
    suggestion = f"{parts.scheme or 'http'}://{socket.gethostname()}:{port}"
    fix = f"set executor_config['callback_url'] to an address workers can reach, e.g. {suggestion}"
    if not config.get("callback_port"):
        fix += f", with executor_config['callback_port'] = {port}"
    if config.get("callback_host", "127.0.0.1") in LOOPBACK:
        fix += " and executor_config['callback_host'] = '0.0.0.0' (it listens on loopback only now)"
    return fix + "; open that port between the workers and this machine"
