"""Service and fixtures for a single-node Slurm cluster (slurmctld, slurmd, munged).

``scripts/slurm-cluster`` starts the cluster inside one directory with its own munge key and socket, free loopback
ports and ``slurm.conf``; the session fixture points Slurm's commands at it through ``SLURM_CONF``, so nothing under
/etc is used and another session's cluster does not interfere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.base import require_binary

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm-cluster"
INSTALL = "apt-get install -y --no-install-recommends slurm-wlm munge"


class SlurmCluster:
    """A cluster started by ``scripts/slurm-cluster`` in ``directory``; its commands read ``conf``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.conf = directory / "slurm.conf"

    def start(self) -> SlurmCluster:
        done = subprocess.run([str(SCRIPT), "start", str(self.directory)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"scripts/slurm-cluster start failed:\n{done.stdout}{done.stderr}")
        return self

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "stop", str(self.directory)], capture_output=True, timeout=120, check=False)

    def env(self) -> dict[str, str]:
        """The environment Slurm's commands need to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *args: str) -> str:
        """Run a Slurm command against this cluster and return its standard output."""
        done = subprocess.run(list(args), capture_output=True, text=True, env=self.env(), timeout=60, check=True)
        return done.stdout

    def state(self, job_id: str) -> str:
        """The job's state as ``squeue`` shows it (finished jobs stay visible for an hour)."""
        return self.command("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T").strip()

    def jobs(self) -> dict[str, tuple[str, str]]:
        """Every job the cluster knows: id -> (name, state)."""
        listing = self.command("squeue", "-h", "-t", "all", "-o", "%i|%j|%T")
        return {i: (name, state) for i, name, state in (line.split("|") for line in listing.splitlines() if line)}

    def job_fields(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as key -> value."""
        fields: dict[str, str] = {}
        for token in self.command("scontrol", "show", "job", job_id).split():
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One single-node cluster for the session; ``SLURM_CONF`` points at it while the session runs."""
    for binary in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol"):
        require_binary(binary, INSTALL)
    if os.geteuid() != 0:
        message = "the single-node Slurm cluster needs root (slurmd starts jobs as their users)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # munged requires every directory above its socket to be searchable by all users: the system temporary directory
    # qualifies, pytest's private base directory does not.
    directory = Path(tempfile.mkdtemp(prefix="wove-slurm-"))
    cluster = SlurmCluster(directory)
    try:
        cluster.start()
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
