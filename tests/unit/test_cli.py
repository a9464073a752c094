"""The ``wove`` command: help, the worker commands it assembles, usage errors and exit statuses.

Commands run in-process through ``wove.cli.main`` (with ``--print-command`` where a worker would start); ``wove demo``
and one ``wove worker`` run as real subprocesses. Starting real workers is in tests/integration/test_doctor.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wove.cli import main
from wove.cli_worker import BACKENDS

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def printed(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict[str, str], list[str]]:
    """The variables and argument vector ``wove worker ... --print-command`` prints."""
    status, out, err = run(capsys, *argv[:2], "--print-command", *argv[2:])
    assert status == 0, err
    words = shlex.split(out)
    cut = words.index(sys.executable)
    return dict(word.split("=", 1) for word in words[:cut]), words[cut:]


@pytest.fixture(autouse=True)
def _own_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands put a configuration's folder on ``sys.path``; keep that from leaking into other tests."""
    monkeypatch.setattr(sys, "path", [*sys.path])


@pytest.fixture(autouse=True)
def _refuse_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guard, not a stand-in: a command that would replace the test process with a worker fails the test instead."""

    def refuse(*args: object) -> None:
        raise AssertionError(f"the command tried to exec {args[1]!r} inside the test process")

    monkeypatch.setattr(os, "execve", refuse)


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder whose wove_config.py has one environment per worker backend, and the working directory."""
    (tmp_path / "wove_config.py").write_text(
        "WOVE_CONFIG = {'environments': {\n"
        "    'default': {},\n"
        "    'jobs': {'executor': 'celery',\n"
        "             'executor_config': {'broker_url': 'redis://broker:6379/3', 'queue': 'q1'}},\n"
        "    'rqjobs': {'executor': 'rq', 'executor_config': {'redis_url': 'redis://r:1/2', 'queue_name': 'q2'}},\n"
        "    'arqjobs': {'executor': 'arq',\n"
        "                'executor_config': {'redis_settings': 'redis://a:1/0', 'queue_name': 'q3'}},\n"
        "    'tq': {'executor': 'taskiq', 'executor_config': {'broker_url': 'redis://t:1/0', 'queue_name': 'q4',\n"
        "                                                    'cancel_channel': 'c4'}},\n"
        "    'flows': {'executor': 'temporal', 'executor_config': {'target_host': 'tmp:7233', 'namespace': 'ns',\n"
        "                                                         'task_queue': 'q5'}},\n"
        "}}\n"
    )
    nested = tmp_path / "src" / "pkg"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)  # found by walking up, as wove.config() finds it
    return tmp_path


# -- help ------------------------------------------------------------------------------------------------------------


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for command in ("demo", "worker", "doctor"):
        assert command in out
    assert "2 usage error" in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys)
    assert status == 2 and "COMMAND" in err


def test_worker_help_lists_every_backend_and_says_where_options_go(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "worker", "--help")
    assert status == 0
    for name in ("celery", "rq", "arq", "taskiq", "temporal"):
        assert f"\n    {name} " in out
    flat = " ".join(out.split())
    assert "everything after --, go to the backend's worker unchanged" in flat
    assert "dask and ray workers need only wove installed" in flat


@pytest.mark.parametrize(
    ("backend", "registers", "own_options"),
    [
        ("celery", "wove.integrations.celery_worker", ["--broker URL", "--queue NAME"]),
        ("rq", "wove.integrations.rq_worker.run_payload", ["--url URL", "--queue NAME", "--fork"]),
        ("arq", "wove.integrations.arq_worker.WorkerSettings", ["--redis-url URL", "--queue NAME"]),
        ("taskiq", "wove.integrations.taskiq_worker:broker", ["--broker-url URL", "--queue NAME"]),
        ("temporal", "the WoveRun workflow and the activity", []),
    ],
)
def test_each_backend_documents_what_it_registers_and_its_options(
    capsys: pytest.CaptureFixture[str], backend: str, registers: str, own_options: list[str]
) -> None:
    status, out, _ = run(capsys, "worker", backend, "--help")
    assert status == 0
    flat = " ".join(out.split())
    assert registers in flat.split("Registers:", 1)[1]
    assert "options wove adds:" in out
    for option in ["--config PATH", "--environment NAME", "--print-command", *own_options]:
        assert option in flat
    assert "everything after --, go to the worker unchanged" in flat
    assert f"pip install 'wove[{backend}]'" in flat
    assert "Example: wove worker" in flat


# -- the worker commands ---------------------------------------------------------------------------------------------


def test_celery_worker_command(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WOVE_CELERY_QUEUE", raising=False)
    env, argv = printed(capsys, "worker", "celery", "--broker", "redis://b:6379/1", "-c", "2", "--", "-l", "INFO")
    assert env == {"WOVE_CELERY_BROKER_URL": "redis://b:6379/1"}
    assert argv[:6] == [sys.executable, "-m", "celery", "-A", "wove.integrations.celery_worker", "worker"]
    assert argv[6:] == ["-Q", "wove", "-c", "2", "-l", "INFO"]


def test_celery_queues_given_to_the_worker_itself_win(capsys: pytest.CaptureFixture[str]) -> None:
    for given in (["-Q", "a,b"], ["-Qa,b"], ["--queues=a,b"]):
        _, argv = printed(capsys, "worker", "celery", "--queue", "mine", "--", *given)
        assert argv[6:] == given


def test_rq_worker_command(capsys: pytest.CaptureFixture[str]) -> None:
    env, argv = printed(capsys, "worker", "rq", "--url", "redis://r:6379/0", "--", "--burst")
    assert env == {}
    assert argv[:6] == [sys.executable, "-m", "rq.cli", "worker", "-w", "wove.integrations.rq_worker.SimpleWorker"]
    assert argv[6:] == ["-u", "redis://r:6379/0", "--burst", "wove"]
    _, forking = printed(capsys, "worker", "rq", "--fork", "--queue", "jobs")
    assert forking[5:] == ["wove.integrations.rq_worker.Worker", "jobs"]


def test_arq_and_taskiq_worker_commands_set_wove_variables(capsys: pytest.CaptureFixture[str]) -> None:
    env, argv = printed(capsys, "worker", "arq", "--redis-url", "redis://a:1/0", "--queue", "arq:x", "--burst")
    assert env == {"WOVE_ARQ_REDIS_URL": "redis://a:1/0", "WOVE_ARQ_QUEUE": "arq:x"}
    assert argv == [sys.executable, "-m", "arq", "wove.integrations.arq_worker.WorkerSettings", "--burst"]
    env, argv = printed(capsys, "worker", "taskiq", "--broker-url", "redis://t:1/0", "--", "--workers", "1")
    assert env == {"WOVE_TASKIQ_BROKER_URL": "redis://t:1/0"}
    assert argv[:5] == [sys.executable, "-m", "taskiq", "worker", "wove.integrations.taskiq_worker:broker"]
    assert argv[5:] == ["--workers", "1"]


def test_temporal_worker_command_passes_everything_through(capsys: pytest.CaptureFixture[str]) -> None:
    env, argv = printed(capsys, "worker", "temporal", "--task-queue", "q", "--", "--log-level", "DEBUG")
    assert env == {}
    assert argv[:3] == [sys.executable, "-m", "wove.integrations.temporal_worker"]
    assert argv[3:] == ["--task-queue", "q", "--log-level", "DEBUG"]


def test_environment_supplies_broker_and_queue(capsys: pytest.CaptureFixture[str], config_dir: Path) -> None:
    env, argv = printed(capsys, "worker", "celery", "--environment", "jobs")
    assert env == {"WOVE_CELERY_BROKER_URL": "redis://broker:6379/3"} and argv[6:] == ["-Q", "q1"]
    env, argv = printed(capsys, "worker", "celery", "--environment", "jobs", "--queue", "over")
    assert argv[6:] == ["-Q", "over"]  # the command line wins over the configuration
    _, argv = printed(capsys, "worker", "rq", "--environment", "rqjobs")
    assert argv[6:] == ["-u", "redis://r:1/2", "q2"]
    env, _ = printed(capsys, "worker", "arq", "--environment", "arqjobs")
    assert env == {"WOVE_ARQ_REDIS_URL": "redis://a:1/0", "WOVE_ARQ_QUEUE": "q3"}
    env, _ = printed(capsys, "worker", "taskiq", "--environment", "tq")
    assert env == {
        "WOVE_TASKIQ_BROKER_URL": "redis://t:1/0",
        "WOVE_TASKIQ_QUEUE": "q4",
        "WOVE_TASKIQ_CANCEL_CHANNEL": "c4",
    }
    _, argv = printed(capsys, "worker", "temporal", "--environment", "flows", "--", "--namespace", "other")
    assert argv[3:] == ["--target-host", "tmp:7233", "--task-queue", "q5", "--namespace", "other"]


def test_environment_from_a_given_config_file(
    capsys: pytest.CaptureFixture[str],
    config_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # no wove_config.py here or above: only --config finds it
    status, _, err = run(capsys, "worker", "rq", "--environment", "rqjobs", "--print-command")
    assert status == 2 and "no wove_config.py" in err and "--config" in err
    _, argv = printed(capsys, "worker", "rq", "--environment", "rqjobs", "--config", str(config_dir / "wove_config.py"))
    assert argv[-1] == "q2"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["worker", "rq", "--environment", "jobs"], "uses executor 'celery', not 'rq'"),
        (["worker", "rq", "--environment", "nope"], "unknown environment 'nope'"),
        (["worker", "rq", "--config", "wove_config.py"], "--config is read only with --environment"),
        (["worker", "nosuch"], "invalid choice: 'nosuch'"),
        (["worker"], "the following arguments are required: BACKEND"),
    ],
)
def test_worker_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], config_dir: Path, argv: list[str], message: str
) -> None:
    status, _, err = run(capsys, *argv[:2], "--print-command", *argv[2:])
    assert status == 2
    assert message in err


@pytest.mark.parametrize(
    ("backend", "executor_config", "message"),
    [
        ("celery", "{'app': object()}", "start that app's worker"),
        ("celery", "{'broker_url': 'redis://b:1/0', 'task_name': 'mine.run'}", "its own Celery app or task name"),
        ("rq", "{'connection': object()}", "executor_config['connection'] as an object, not a URL: pass --url"),
        ("arq", "{'redis_settings': {'host': 'a'}}", "executor_config['redis_settings'] as an object"),
        ("arq", "{'function': 'mine.run'}", "add wove_function"),
        ("taskiq", "{'broker': object()}", "its own Taskiq broker"),
        ("temporal", "{'client': object()}", "pass --target-host HOST:PORT"),
    ],
)
def test_an_environment_whose_worker_wove_cannot_start_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, backend: str, executor_config: str, message: str
) -> None:
    config = tmp_path / "wove_config.py"
    config.write_text(
        f"WOVE_CONFIG = {{'environments': {{'default': {{}}, 'x': {{'executor': {backend!r}, "
        f"'executor_config': {executor_config}}}}}}}\n"
    )
    status, _, err = run(capsys, "worker", backend, "--print-command", "--environment", "x", "--config", str(config))
    assert status == 2 and message in err


def test_an_object_is_fine_when_the_command_line_says_where(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "wove_config.py"
    config.write_text(
        "WOVE_CONFIG = {'environments': {'default': {}, "
        "'x': {'executor': 'rq', 'executor_config': {'connection': object(), 'queue_name': 'q'}}}}\n"
    )
    _, argv = printed(capsys, "worker", "rq", "--environment", "x", "--config", str(config), "--url", "redis://r:1/0")
    assert argv[6:] == ["-u", "redis://r:1/0", "q"]


def test_a_missing_backend_package_exits_1_naming_the_pip_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module that does not exist stands in for Celery, so the real check (importlib's find_spec) finds it missing.
    absent = dataclasses.replace(BACKENDS["celery"], modules=("wove_test_no_such_sdk",))
    monkeypatch.setitem(BACKENDS, "celery", absent)
    status, out, err = run(capsys, "worker", "celery", "--broker", "redis://b:1/0")
    assert status == 1 and out == ""
    assert "wove_test_no_such_sdk, which is not installed; run: pip install 'wove[celery]'" in err


def test_a_worker_command_replaces_the_process_and_passes_options_through() -> None:
    """``wove worker rq -- --help`` execs RQ's own command: the help is RQ's, and so is the exit status."""
    done = subprocess.run(
        [sys.executable, "-m", "wove", "worker", "rq", "--", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: python -m rq.cli worker" in done.stdout and "Starts an RQ worker" in done.stdout


def test_the_worker_examples_of_the_docs_are_valid(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "wove_config.py"
    config.write_text(
        "WOVE_CONFIG = {'environments': {'default': {}, 'jobs': {'executor': 'celery'}, "
        "'tasks': {'executor': 'taskiq'}, 'flows': {'executor': 'temporal'}}}\n"
    )
    text = (ROOT / "docs" / "cli.md").read_text()
    lines = [line.split("  #")[0].split() for line in text.splitlines() if line.startswith("wove worker ")]
    examples = [words for words in lines if words[2] in BACKENDS]  # not the usage line
    assert len(examples) >= 7
    for words in examples:
        if "--environment" in words:
            words[3:3] = ["--config", str(config)]
        _, argv = printed(capsys, *words[1:])
        assert argv[:2] == [sys.executable, "-m"]


# -- doctor: usage --------------------------------------------------------------------------------------------------


def test_doctor_without_a_configuration_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    status, _, err = run(capsys, "doctor")
    assert status == 2 and "no wove_config.py" in err
    status, out, _ = run(capsys, "doctor", "--json")
    assert status == 2 and json.loads(out)["ok"] is False
    status, _, err = run(capsys, "doctor", "--config", str(tmp_path / "missing.py"))
    assert status == 2 and "no such file" in err


def test_doctor_usage_errors(capsys: pytest.CaptureFixture[str], config_dir: Path) -> None:
    status, _, err = run(capsys, "doctor", "--environment", "nope")
    assert status == 2 and "unknown environment 'nope'" in err and "'jobs'" in err
    status, _, err = run(capsys, "doctor", "--timeout", "0")
    assert status == 2 and "more than 0" in err
    status, _, err = run(capsys, "doctor", "extra")
    assert status == 2 and "unrecognized arguments: extra" in err


def test_doctor_reports_an_invalid_configuration(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "wove_config.py"
    config.write_text("WOVE_CONFIG = {'environments': {'x': {'executor': 'process', 'retries': -1}}}\n")
    status, _, err = run(capsys, "doctor", "--config", str(config))
    assert status == 2 and "retries must be an integer >= 0" in err


def test_doctor_on_a_local_only_configuration_passes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "wove_config.py"
    config.write_text("WOVE_CONFIG = {'environments': {'default': {'executor': 'local'}}}\n")
    status, out, _ = run(capsys, "doctor", "--config", str(config))
    assert status == 0
    assert "ok    executor  tasks run in the submitting process" in out


def test_doctor_names_an_unknown_adapter_and_how_to_register_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "wove_config.py"
    config.write_text("WOVE_CONFIG = {'environments': {'default': {}, 'x': {'executor': 'nosuch'}}}\n")
    status, out, _ = run(capsys, "doctor", "--config", str(config), "--json")
    assert status == 1
    report = json.loads(out)
    (env,) = [env for env in report["environments"] if env["name"] == "x"]
    assert [(c["name"], c["status"]) for c in env["checks"]] == [
        ("installed", "FAIL"),
        ("backend", "skip"),
        ("callback", "skip"),
        ("submit", "skip"),
        ("ping", "skip"),
    ]
    assert "register_adapter('nosuch'" in env["checks"][0]["fix"]


def test_doctor_names_the_runtime_loop_and_refuses_a_bad_choice(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "wove_config.py"
    config.write_text("WOVE_CONFIG = {'environments': {'default': {}, 'pool': {'executor': 'process'}}}\n")
    monkeypatch.setenv("WOVE_EVENT_LOOP", "asyncio")
    status, out, _ = run(capsys, "doctor", "--config", str(config), "--json")
    (env,) = [env for env in json.loads(out)["environments"] if env["name"] == "pool"]
    assert status == 0, out
    assert env["checks"][0]["detail"] == "aiohttp, cloudpickle, httptools; runtime loop: asyncio"

    monkeypatch.setenv("WOVE_EVENT_LOOP", "fast")
    status, out, _ = run(capsys, "doctor", "--config", str(config), "--json")
    (env,) = [env for env in json.loads(out)["environments"] if env["name"] == "pool"]
    assert status == 1
    installed = env["checks"][0]
    assert installed["status"] == "FAIL" and "got 'fast'" in installed["detail"]
    assert installed["fix"] == "set WOVE_EVENT_LOOP to auto, uvloop or asyncio, or unset it"
    assert {check["status"] for check in env["checks"][1:]} == {"skip"}


def test_doctor_pings_through_a_custom_executor(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "wove_config.py"
    config.write_text(
        "from wove.environment.local import LocalEnvironmentExecutor\n"
        "WOVE_CONFIG = {'environments': {'default': {}, 'mine': {'executor': LocalEnvironmentExecutor}}}\n"
    )
    status, out, _ = run(capsys, "doctor", "--config", str(config), "--environment", "mine", "--json")
    assert status == 0, out
    (env,) = json.loads(out)["environments"]
    assert env["executor"] == "LocalEnvironmentExecutor" and env["callback_url"] is None
    checks = {check["name"]: check for check in env["checks"]}
    assert list(checks) == ["installed", "backend", "submit", "ping", "versions"]
    assert checks["ping"]["detail"].startswith(f"worker {socket.gethostname()}:{os.getpid()} ran it")


# -- demo -------------------------------------------------------------------------------------------------------------


def test_demo_still_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "wove", "demo"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "priced 36 products in worker processes" in done.stdout
