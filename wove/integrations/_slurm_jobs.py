"""The pure parts of the ``slurm`` backend: settings, job names, batch scripts, and reading Slurm's answers.

Nothing here runs a command or touches the event loop, so all of it is unit-tested without a cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from wove.errors import ConfigError

__all__ = [
    "ENDED_STATES",
    "ENV_PAYLOAD_LIMIT",
    "JobStatus",
    "SlurmJob",
    "SlurmSettings",
    "build_script",
    "describe_exit",
    "failure_message",
    "job_name",
    "parse_job_id",
    "parse_scontrol",
    "parse_squeue",
    "tail_text",
]

#: Job states after which Slurm never runs the job again (it keeps showing them for ``MinJobAge`` seconds).
ENDED_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}
)
#: Ended states caused by the cluster rather than the task; a new run may well succeed.
RETRYABLE_STATES = frozenset({"BOOT_FAIL", "NODE_FAIL", "PREEMPTED"})
#: Exit codes of ``python -m wove.backend_worker`` after it delivered its own terminal frame (result, task error,
#: cancelled on SIGTERM): a job ending with one of these most likely told the weave already.
WORKER_REPORTED_EXITS = frozenset({0, 1, 143})
#: The payload goes into the script as an environment variable up to this many characters; the kernel refuses a single
#: variable over 128 KiB when the worker is exec'd. Longer payloads are fed to the worker's standard input instead.
ENV_PAYLOAD_LIMIT = 120 * 1024
#: The longest task-name part of a job name; the run id that follows is never shortened.
TASK_NAME_PART = 48
#: The squeue ``--Format`` wove polls with: id, state, raw exit status, reason, each ended by ``|``.
SQUEUE_FORMAT = "JobID:|,State:|,exit_code:|,Reason:|"
#: Output lines (and at most this many characters) a failure message quotes.
TAIL_LINES, TAIL_CHARS = 20, 4000

#: What a custom ``submit`` callable returns: the job id (``sbatch --parsable`` output works as is).
SubmitResult: TypeAlias = "str | int | Awaitable[str | int]"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_JOB_ID = re.compile(r"\d+(_\d+)?\Z")
#: Options wove sets itself, or that would break one job per run: option -> why.
_RESERVED = {
    "--job-name": "wove names each job; use job_name_prefix",
    "-J": "wove names each job; use job_name_prefix",
    "--parsable": "wove reads the job id itself",
    "--wrap": "wove writes the batch script",
    "--wait": "wove never blocks on a job; results come back over the callback server",
    "-W": "wove never blocks on a job; results come back over the callback server",
    "--array": "each run is one job",
    "-a": "each run is one job",
    "--clusters": "wove polls one cluster; point SLURM_CONF at the cluster's configuration instead",
    "-M": "wove polls one cluster; point SLURM_CONF at the cluster's configuration instead",
}
_OUTPUT_OPTIONS = ("--output", "-o", "--error", "-e")


@dataclass(frozen=True)
class SlurmJob:
    """One run as Slurm gets it; a custom ``submit`` callable receives this and returns the job id.

    ``script`` is the whole batch script (``#!/bin/sh``, the ``setup`` lines, ``env`` exports, the payload, and
    ``exec python -m wove.backend_worker``). ``options`` are the sbatch options wove would pass (job name, output
    file, then ``sbatch_options``); ``argv`` is the complete command wove runs with the script on standard input.
    The script carries the run's callback credential: treat it as a secret.
    """

    run_id: str
    task_name: str
    name: str
    script: str = field(repr=False)
    options: tuple[str, ...]
    argv: tuple[str, ...]
    output: str | None


@dataclass(frozen=True)
class JobStatus:
    """One line of ``squeue``: state, raw wait status (``None`` when Slurm gives none) and reason."""

    state: str
    exit_status: int | None
    reason: str

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @property
    def worker_reported(self) -> bool:
        """The exit looks like the worker's own after it delivered a terminal frame (so give that frame a moment)."""
        if self.state == "CANCELLED":
            return True  # a running worker turns SIGTERM into task_cancelled
        code = exit_code(self.exit_status)
        return code is not None and code in WORKER_REPORTED_EXITS


@dataclass(frozen=True)
class SlurmSettings:
    """The ``slurm`` executor's configuration, validated once when the environment starts."""

    python: tuple[str, ...]
    setup: tuple[str, ...]
    env: Mapping[str, str]
    sbatch_options: tuple[str, ...]
    job_name_prefix: str
    output_dir: str | None
    poll_interval: float
    submit: Callable[[SlurmJob], SubmitResult] | None
    sbatch: tuple[str, ...]
    squeue: tuple[str, ...]
    scancel: tuple[str, ...]
    scontrol: tuple[str, ...]

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> SlurmSettings:
        """Read and check ``config`` (an ``executor_config``); a bad value raises ``ConfigError`` naming its key."""

        def fail(key: str, what: str, value: Any) -> ConfigError:
            return ConfigError(f"environment {name!r}: executor_config[{key!r}] must be {what}, got {value!r}")

        output_dir = config.get("output_dir")
        if output_dir is not None and (not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir)):
            raise fail("output_dir", "a directory path (job output files go there)", output_dir)
        poll = config.get("poll_interval", 1.0)
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0 < poll <= 3600:
            raise fail("poll_interval", "seconds between squeue polls, above 0", poll)
        prefix = config.get("job_name_prefix", "wove")
        if not isinstance(prefix, str) or not prefix or _UNSAFE.search(prefix):
            raise fail("job_name_prefix", "a non-empty string of letters, digits, '_', '.', '-'", prefix)
        submit = config.get("submit")
        if submit is not None and not callable(submit):
            raise fail("submit", "a callable receiving a SlurmJob and returning its job id", submit)
        options = _sbatch_options(config.get("sbatch_options"), fail)
        if output_dir is not None:
            clash = [opt for opt in options if _is_option(opt, _OUTPUT_OPTIONS)]
            if clash:
                raise ConfigError(
                    f"environment {name!r}: sbatch_options set {clash[0]!r} and output_dir is set too; keep one"
                )
        return cls(
            python=_command(config.get("python", sys.executable), "python", fail),
            setup=_lines(config.get("setup", ()), fail),
            env=_env(config.get("env") or {}, fail),
            sbatch_options=options,
            job_name_prefix=prefix,
            output_dir=os.path.abspath(os.fspath(output_dir)) if output_dir is not None else None,
            poll_interval=float(poll),
            submit=submit,
            sbatch=_command(config.get("sbatch", "sbatch"), "sbatch", fail),
            squeue=_command(config.get("squeue", "squeue"), "squeue", fail),
            scancel=_command(config.get("scancel", "scancel"), "scancel", fail),
            scontrol=_command(config.get("scontrol", "scontrol"), "scontrol", fail),
        )

    def job(self, run_id: str, task_name: str, payload_b64: str) -> SlurmJob:
        """The job of one run: its unique name, its output file, its batch script and the sbatch command."""
        name = job_name(self.job_name_prefix, task_name, run_id)
        output = os.path.join(self.output_dir, f"{name}.out") if self.output_dir is not None else None
        options = [f"--job-name={name}"]
        if output is not None:
            options.append("--output=" + output.replace("%", "%%"))  # sbatch expands %j, %x, ... in file names
        options.extend(self.sbatch_options)
        script = build_script(self.python, payload_b64, setup=self.setup, env=self.env, comment=name)
        argv = (*self.sbatch, "--parsable", *options)
        return SlurmJob(run_id, task_name, name, script, tuple(options), argv, output)


def job_name(prefix: str, task_name: str, run_id: str) -> str:
    """``<prefix>-<task>-<run id>``: the task part made safe and cut to ``TASK_NAME_PART``; the run id kept whole."""
    task = _UNSAFE.sub("_", task_name).strip("_.-")[:TASK_NAME_PART] or "task"
    return f"{prefix}-{task}-{_UNSAFE.sub('_', run_id)}"


def build_script(
    python: Sequence[str],
    payload_b64: str,
    *,
    setup: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    comment: str = "",
) -> str:
    """The batch script of one run: setup lines, exports, then ``exec python -m wove.backend_worker``.

    The payload goes in ``WOVE_BACKEND_PAYLOAD`` up to ``ENV_PAYLOAD_LIMIT`` characters and through a here-document
    on the worker's standard input beyond that (a batch script may hold 4 MiB by default).
    """
    lines = ["#!/bin/sh"]
    if comment:
        lines.append(f"# {_UNSAFE.sub('_', comment)}: a wove run (python -m wove.backend_worker)")
    lines.extend(setup)
    lines.extend(f"export {key}={shlex.quote(value)}" for key, value in (env or {}).items())
    command = " ".join(shlex.quote(part) for part in python) + " -m wove.backend_worker"
    if len(payload_b64) <= ENV_PAYLOAD_LIMIT:
        lines.append(f"export WOVE_BACKEND_PAYLOAD={shlex.quote(payload_b64)}")
        lines.append(f"exec {command}")
    else:  # the payload is URL-safe base64: no line of it can end the here-document
        lines.extend([f"exec {command} - <<'WOVE_PAYLOAD_END'", payload_b64, "WOVE_PAYLOAD_END"])
    return "\n".join(lines) + "\n"


def parse_job_id(value: Any) -> str:
    """The job id in ``sbatch --parsable`` output (``"123"`` or ``"123;cluster"``) or a custom submit's return."""
    text = str(value).strip().split(";", 1)[0].strip() if isinstance(value, (str, int)) else ""
    if isinstance(value, bool) or not _JOB_ID.match(text):
        raise ValueError(f"expected a Slurm job id such as '1234', got {value!r}")
    return text


def parse_squeue(output: str) -> dict[str, JobStatus]:
    """Job id -> status, from ``squeue -h -O SQUEUE_FORMAT`` output; lines that do not parse are skipped."""
    statuses: dict[str, JobStatus] = {}
    for line in output.splitlines():
        parts = line.split("|", 3)
        if len(parts) < 4 or not parts[0].strip():
            continue
        job_id, state, status, reason = (part.strip() for part in parts)
        state = state.split()[0].rstrip("+") if state else "UNKNOWN"  # "CANCELLED by 0", "CANCELLED+"
        raw = int(status) if status.isdigit() else None
        statuses[job_id] = JobStatus(state, raw, reason.rstrip("|").strip())
    return statuses


def parse_scontrol(output: str) -> dict[str, str]:
    """``Key=Value`` pairs of ``scontrol show job`` (a value ends at the next space; paths with spaces are cut)."""
    fields: dict[str, str] = {}
    for token in output.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def exit_code(status: int | None) -> int | None:
    """The exit code in a raw wait status, or ``None`` when a signal ended the process."""
    if status is None or status & 0x7F:
        return None
    return (status >> 8) & 0xFF


def describe_exit(status: int | None) -> str:
    """``"exit code 3"``, ``"signal 9 (SIGKILL)"``, or ``""`` when unknown."""
    if status is None:
        return ""
    code = exit_code(status)
    if code is not None:
        return f"exit code {code}"
    number = status & 0x7F
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


def failure_message(job_id: str, name: str, status: JobStatus | None, output: str | None, tail: str) -> str:
    """What the weave's error says about a job that ended without its worker's outcome: Slurm's view, then output."""
    if status is None:
        message = f"Slurm job {job_id} ({name}) is no longer known to Slurm and its worker reported no outcome"
    else:
        reason = f"reason {status.reason}" if status.reason and status.reason != "None" else ""
        details = ", ".join(part for part in (reason, describe_exit(status.exit_status)) if part)
        ended = f"ended {status.state}" + (f" ({details})" if details else "")
        message = f"Slurm job {job_id} ({name}) {ended} without an outcome from its worker"
    if tail:
        return f"{message}; last lines of {output}:\n{tail}"
    if output:
        return f"{message}; its output file {output} is empty or unreadable"
    return message


def tail_text(data: bytes) -> str:
    """The last ``TAIL_LINES`` lines (at most ``TAIL_CHARS`` characters) of a job's output, decoded leniently."""
    lines = data.decode("utf-8", errors="replace").rstrip().splitlines()[-TAIL_LINES:]
    return "\n".join(lines)[-TAIL_CHARS:]


# -- config readers ----------------------------------------------------------------------------------------------


def _command(value: Any, key: str, fail: Callable[[str, str, Any], ConfigError]) -> tuple[str, ...]:
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        return (os.fspath(value),)
    if isinstance(value, (list, tuple)) and value and all(isinstance(part, str) and part for part in value):
        return tuple(value)
    raise fail(key, "a program path or a non-empty list of strings (a command and its arguments)", value)


def _lines(value: Any, fail: Callable[[str, str, Any], ConfigError]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.splitlines()
    if isinstance(value, (list, tuple)) and all(isinstance(line, str) for line in value):
        return tuple(value)
    raise fail("setup", "shell lines (a string or a list of strings) run before the worker", value)


def _env(value: Any, fail: Callable[[str, str, Any], ConfigError]) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise fail("env", "a mapping of environment variable names to strings", value)
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key) or not isinstance(item, str):
            raise fail("env", "a mapping of environment variable names to strings", {key: item})
        if key == "WOVE_BACKEND_PAYLOAD":
            raise fail("env", "free of WOVE_BACKEND_PAYLOAD (wove sets it)", {key: "..."})
    return dict(value)


def _sbatch_options(value: Any, fail: Callable[[str, str, Any], ConfigError]) -> tuple[str, ...]:
    """A mapping (``{"partition": "debug", "exclusive": True}``) or a list (``["-p", "debug"]``) of sbatch options."""
    if value is None:
        return ()
    options: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or not key.strip("-"):
                raise fail("sbatch_options", "a mapping of option names to values", value)
            if item is False or item is None:
                continue  # left out
            flag = f"-{key}" if len(key) == 1 else "--" + key.lstrip("-").replace("_", "-")
            if item is True:
                options.append(flag)
            elif len(key) == 1:
                options.extend([flag, str(item)])
            else:
                options.append(f"{flag}={item}")
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        options.extend(value)
    else:
        raise fail("sbatch_options", "a mapping of sbatch option names to values, or a list of arguments", value)
    for option in options:
        for reserved, why in _RESERVED.items():
            if _is_option(option, (reserved,)):
                raise ConfigError(f"executor_config['sbatch_options'] may not set {reserved}: {why}")
    return tuple(options)


def _is_option(argument: str, names: Sequence[str]) -> bool:
    """``argument`` is one of the options ``names`` (``--name``, ``--name=x``, ``-n``, ``-nx``)."""
    for name in names:
        if argument == name or (name.startswith("--") and argument.startswith(name + "=")):
            return True
        if not name.startswith("--") and argument.startswith(name) and not argument.startswith("--"):
            return True
    return False
