"""A real Redis server on a free loopback port, without persistence (Debian's ``redis-server``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.services.base import free_port, port_open, require_binary, wait_until


class RedisServer:
    """``redis-server`` daemonized into ``directory``; ``url(db)`` gives a connection URL."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.pidfile = directory / "redis.pid"
        self.logfile = directory / "redis.log"

    def start(self) -> RedisServer:
        binary = require_binary("redis-server", "apt-get install -y redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
                "--logfile",
                str(self.logfile),
                "--dir",
                str(self.directory),
            ],
            check=True,
        )
        wait_until(lambda: port_open(self.port), 10, "redis-server", self.logfile)
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if not self.pidfile.exists():
            return
        pid = int(self.pidfile.read_text().strip())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
