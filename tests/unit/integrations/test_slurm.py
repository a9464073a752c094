"""The ``slurm`` backend's pure parts: settings, job names, batch scripts, and reading squeue/scontrol output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wove.errors import ConfigError
from wove.integrations._slurm_jobs import (
    ENV_PAYLOAD_LIMIT,
    JobStatus,
    SlurmSettings,
    build_script,
    describe_exit,
    failure_message,
    job_name,
    parse_job_id,
    parse_scontrol,
    parse_squeue,
    tail_text,
)
from wove.integrations.slurm import SlurmAdapter

RUN_ID = "0123456789abcdef0123456789abcdef"


def settings(**config: Any) -> SlurmSettings:
    return SlurmSettings.from_config("jobs", config)


# -- names -------------------------------------------------------------------------------------------------------------


def test_job_names_keep_the_whole_run_id_and_a_safe_short_task_part() -> None:
    assert job_name("wove", "price", RUN_ID) == f"wove-price-{RUN_ID}"
    assert job_name("wove", "<lambda> / x y", RUN_ID) == f"wove-lambda_x_y-{RUN_ID}"
    assert job_name("wove", "...", RUN_ID) == f"wove-task-{RUN_ID}"
    long_a, long_b = "a" * 300 + "_one", "a" * 300 + "_two"
    name_a, name_b = job_name("wove", long_a, RUN_ID), job_name("wove", long_b, RUN_ID[::-1])
    assert name_a == f"wove-{'a' * 48}-{RUN_ID}" and len(name_a) < 120
    assert name_a != name_b  # different runs never share a name, however long the task name


def test_job_names_are_unique_per_run_for_the_same_task() -> None:
    names = {job_name("wove", "t" * 500, f"{i:032x}") for i in range(100)}
    assert len(names) == 100


# -- settings ----------------------------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = settings()
    assert s.python == (sys.executable,) and s.setup == () and s.env == {} and s.sbatch_options == ()
    assert s.job_name_prefix == "wove" and s.output_dir is None and s.poll_interval == 1.0 and s.submit is None
    assert (s.sbatch, s.squeue, s.scancel, s.scontrol) == (("sbatch",), ("squeue",), ("scancel",), ("scontrol",))


def test_sbatch_options_from_a_mapping_or_a_list() -> None:
    mapping = {"partition": "gpu", "time": "01:00:00", "exclusive": True, "requeue": False, "qos": None, "n": 2}
    mapping["mem_per_cpu"] = "2G"
    assert settings(sbatch_options=mapping).sbatch_options == (
        "--partition=gpu",
        "--time=01:00:00",
        "--exclusive",
        "-n",
        "2",
        "--mem-per-cpu=2G",
    )
    assert settings(sbatch_options=["-p", "gpu", "--qos=high"]).sbatch_options == ("-p", "gpu", "--qos=high")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"sbatch_options": {"job_name": "x"}}, "may not set --job-name: wove names each job"),
        ({"sbatch_options": ["-Jx"]}, "may not set -J"),
        ({"sbatch_options": ["--wrap=true"]}, "may not set --wrap"),
        ({"sbatch_options": {"wait": True}}, "may not set --wait"),
        ({"sbatch_options": ["--array", "1-3"]}, "may not set --array"),
        ({"sbatch_options": {"clusters": "b"}}, "may not set --clusters.*SLURM_CONF"),
        ({"sbatch_options": "-p gpu"}, r"\['sbatch_options'\] must be a mapping"),
        ({"sbatch_options": {"output": "x"}, "output_dir": "/tmp/o"}, "set '--output=x' and output_dir is set too"),
        ({"poll_interval": 0}, r"\['poll_interval'\] must be seconds"),
        ({"poll_interval": True}, r"\['poll_interval'\] must be seconds"),
        ({"job_name_prefix": "my jobs"}, r"\['job_name_prefix'\] must be"),
        ({"submit": "sbatch"}, r"\['submit'\] must be a callable"),
        ({"python": ""}, r"\['python'\] must be a program path"),
        ({"sbatch": ["ssh", 3]}, r"\['sbatch'\] must be a program path"),
        ({"env": {"BAD-NAME": "x"}}, r"\['env'\] must be a mapping"),
        ({"env": {"A": 1}}, r"\['env'\] must be a mapping"),
        ({"env": {"WOVE_BACKEND_PAYLOAD": "x"}}, "free of WOVE_BACKEND_PAYLOAD"),
        ({"setup": [1]}, r"\['setup'\] must be shell lines"),
        ({"output_dir": ""}, r"\['output_dir'\] must be a directory path"),
    ],
)
def test_bad_configuration_is_refused(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SlurmAdapter(name="jobs", config=config, callback_url="http://127.0.0.1:1", run_config={})


def test_a_job_gets_its_name_output_file_and_command(tmp_path: Path) -> None:
    s = settings(
        output_dir=str(tmp_path / "100%"), sbatch_options={"partition": "debug"}, sbatch=["ssh", "login", "sb"]
    )
    job = s.job(RUN_ID, "price", "zPAYLOAD")
    assert job.name == f"wove-price-{RUN_ID}" and job.run_id == RUN_ID and job.task_name == "price"
    assert job.output == str(tmp_path / "100%" / f"{job.name}.out")
    output_option = f"--output={tmp_path}/100%%/{job.name}.out"  # sbatch would expand a lone %
    assert job.options == (f"--job-name={job.name}", output_option, "--partition=debug")
    assert job.argv == ("ssh", "login", "sb", "--parsable", *job.options)
    assert "zPAYLOAD" in job.script and "zPAYLOAD" not in repr(job)  # the credential stays out of logs


def test_a_relative_output_dir_is_made_absolute() -> None:
    assert settings(output_dir="out").output_dir == os.path.join(os.getcwd(), "out")


# -- scripts -----------------------------------------------------------------------------------------------------------


def run_script(script: str, tmp_path: Path) -> str:
    """Run a built script with ``sh``: its "python" prints the payload it was given, from the env or stdin."""
    path = tmp_path / "job.sh"
    path.write_text(script)
    return subprocess.run(["sh", str(path)], capture_output=True, text=True, check=True, timeout=30).stdout


ECHO_PAYLOAD = (
    sys.executable,
    "-c",
    "import os, sys; sys.stdout.write(os.environ.get('WOVE_BACKEND_PAYLOAD') or sys.stdin.read())",
)


@pytest.mark.parametrize("size", [10, ENV_PAYLOAD_LIMIT, ENV_PAYLOAD_LIMIT + 1, 2 * 1024 * 1024])
def test_the_script_delivers_the_payload_exactly(size: int, tmp_path: Path) -> None:
    payload = "z" + ("Ab-_9" * size)[: size - 1]  # payload_to_b64's alphabet
    script = build_script(ECHO_PAYLOAD, payload)
    assert run_script(script, tmp_path).strip() == payload
    through_env = size <= ENV_PAYLOAD_LIMIT
    assert ("export WOVE_BACKEND_PAYLOAD=" in script) == through_env
    assert ("<<'WOVE_PAYLOAD_END'" in script) == (not through_env)


def test_setup_and_env_come_before_the_worker_and_are_quoted(tmp_path: Path) -> None:
    show = (sys.executable, "-c", "import os; print(os.environ['GREETING'], os.environ['FROM_SETUP'])")
    env = {"GREETING": 'it\'s $HOME `x` "q"'}
    script = build_script(show, "zP", setup=["FROM_SETUP=ran; export FROM_SETUP"], env=env, comment="wove-a b")
    assert script.startswith("#!/bin/sh\n# wove-a_b: a wove run")
    assert run_script(script, tmp_path).strip() == 'it\'s $HOME `x` "q" ran'
    assert script.rstrip().endswith(" -m wove.backend_worker")
    assert script.index("FROM_SETUP=ran") < script.index("export GREETING") < script.index("WOVE_BACKEND_PAYLOAD")


# -- reading Slurm -----------------------------------------------------------------------------------------------------


def test_parse_job_id() -> None:
    assert parse_job_id("1234") == "1234"
    assert parse_job_id("1234;cluster") == "1234"
    assert parse_job_id(" 77\n") == "77"
    assert parse_job_id(42) == "42"
    for bad in ("", "Submitted batch job 5", None, True, 1.5):
        with pytest.raises(ValueError, match="expected a Slurm job id"):
            parse_job_id(bad)


def test_parse_squeue() -> None:
    output = (
        "12|RUNNING|0|None|\n13|FAILED|768|NonZeroExitCode|\n14|CANCELLED|15|None|\ngarbage\n15|PENDING||Priority|\n"
    )
    statuses = parse_squeue(output)
    assert statuses == {
        "12": JobStatus("RUNNING", 0, "None"),
        "13": JobStatus("FAILED", 768, "NonZeroExitCode"),
        "14": JobStatus("CANCELLED", 15, "None"),
        "15": JobStatus("PENDING", None, "Priority"),
    }
    assert not statuses["12"].ended and statuses["13"].ended and statuses["14"].ended


def test_parse_scontrol() -> None:
    text = "JobId=13 JobName=wove-x\n   JobState=FAILED Reason=NonZeroExitCode ExitCode=127:0\n   StdOut=/o/x.out\n"
    fields = parse_scontrol(text)
    assert fields["JobState"] == "FAILED" and fields["StdOut"] == "/o/x.out" and fields["ExitCode"] == "127:0"


@pytest.mark.parametrize(
    ("status", "text"),
    [(None, ""), (0, "exit code 0"), (3 << 8, "exit code 3"), (9, "signal 9 (SIGKILL)"), (15, "signal 15 (SIGTERM)")],
)
def test_describe_exit(status: int | None, text: str) -> None:
    assert describe_exit(status) == text


@pytest.mark.parametrize(
    ("status", "reported"),
    [
        (JobStatus("COMPLETED", 0, "None"), True),
        (JobStatus("FAILED", 1 << 8, "NonZeroExitCode"), True),  # the task raised: the worker posted its exception
        (JobStatus("FAILED", 143 << 8, "NonZeroExitCode"), True),
        (JobStatus("CANCELLED", 15, "None"), True),
        (JobStatus("FAILED", 127 << 8, "NonZeroExitCode"), False),
        (JobStatus("FAILED", 3 << 8, "NonZeroExitCode"), False),  # the callback server was unreachable
        (JobStatus("FAILED", 9, "JobLaunchFailure"), False),
        (JobStatus("NODE_FAIL", None, "None"), False),
    ],
)
def test_which_endings_may_follow_a_posted_outcome(status: JobStatus, reported: bool) -> None:
    assert status.worker_reported is reported


def test_failure_messages_carry_slurms_view_and_the_output() -> None:
    failed = JobStatus("FAILED", 127 << 8, "NonZeroExitCode")
    message = failure_message("13", "wove-x-1", failed, "/o/x.out", "sh: exec: python: not found")
    assert message == (
        "Slurm job 13 (wove-x-1) ended FAILED (reason NonZeroExitCode, exit code 127) without an outcome from its "
        "worker; last lines of /o/x.out:\nsh: exec: python: not found"
    )
    node = failure_message("14", "wove-x-2", JobStatus("NODE_FAIL", None, "None"), None, "")
    assert node == "Slurm job 14 (wove-x-2) ended NODE_FAIL without an outcome from its worker"
    empty = failure_message("15", "wove-x-3", JobStatus("COMPLETED", 0, "None"), "/o/y.out", "")
    assert empty.endswith("its output file /o/y.out is empty or unreadable")
    gone = failure_message("16", "wove-x-4", None, None, "")
    assert gone == "Slurm job 16 (wove-x-4) is no longer known to Slurm and its worker reported no outcome"


def test_tail_text_keeps_the_last_lines() -> None:
    data = "".join(f"line {i}\n" for i in range(100)).encode() + b"\xff\n"
    lines = tail_text(data).splitlines()
    assert len(lines) == 20 and lines[0] == "line 81" and lines[-1] == "\ufffd"
    assert len(tail_text(b"x" * 100_000)) == 4000
