"""Configuration: validation names what is allowed, and values resolve task -> weave -> env -> global."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import wove
from wove import ConfigError, UnknownEnvironmentError, weave
from wove.config import current_settings


def test_defaults_resolve_in_order() -> None:
    wove.config(
        environments={"default": {"executor": "local", "retries": 3}, "other": {"executor": "local"}},
        retries=1,
        timeout=9.0,
    )
    settings = current_settings()
    assert settings.resolve("retries", "default", {}, {}) == 3  # environment beats global
    assert settings.resolve("retries", "other", {}, {}) == 1  # global beats built-in
    assert settings.resolve("retries", "default", {"retries": 5}, {"retries": 4}) == 5  # task beats weave
    assert settings.resolve("retries", "default", {}, {"retries": 4}) == 4  # weave beats environment
    assert settings.resolve("workers", "default", {}, {}) is None  # built-in
    assert settings.resolve("timeout", "other", {}, {}) == 9.0


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("delivery_orphan_policy", "explode", "'fail', 'cancel', 'requeue', 'detach'"),
        ("delivery_cancel_mode", "maybe", "'best_effort', 'require_ack'"),
        ("error_mode", "ignore", "'raise', 'return'"),
    ],
)
def test_bad_policy_values_list_the_allowed_ones(key: str, value: str, allowed: str) -> None:
    with pytest.raises(ValueError, match=allowed):
        wove.config(environments={"default": {"executor": "local", key: value}})
    with pytest.raises(ValueError, match=allowed):
        wove.config(**{key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [("retries", -1), ("retries", 1.5), ("timeout", 0), ("workers", 0), ("delivery_max_in_flight", True)],
)
def test_bad_numbers_are_refused(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        wove.config(**{key: value})


def test_unknown_keys_are_named_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="retrys.*allowed:.*retries"):
        wove.config(environments={"default": {"retrys": 2}})


def test_a_failed_config_call_changes_nothing() -> None:
    wove.config(environments={"default": {"executor": "local", "retries": 2}})
    with pytest.raises(ConfigError):
        wove.config(environments={"default": {"retries": "many"}})
    assert current_settings().resolve("retries", "default") == 2


def test_unknown_default_environment_is_a_name_error() -> None:
    with pytest.raises(NameError, match="'a', 'b'"):
        wove.config(default_environment="c", environments={"a": {}, "b": {}})


def test_unknown_task_environment_names_the_known_ones_before_running() -> None:
    wove.config(environments={"default": {}, "reports": {}})
    ran: list[int] = []
    with pytest.raises(UnknownEnvironmentError) as info, weave() as w:

        @w.do
        def fine() -> None:
            ran.append(1)

        @w.do(environment="report")
        def typo() -> None:
            ran.append(2)

    assert isinstance(info.value, NameError)
    assert "'report'" in str(info.value) and "'default', 'reports'" in str(info.value)
    assert ran == []


def test_bad_task_option_is_refused_at_declaration() -> None:
    with weave() as w, pytest.raises(ConfigError, match="@w.do: timeout"):

        @w.do(timeout=-1)
        def t() -> None: ...


def test_config_without_arguments_loads_wove_config_from_a_parent(tmp_path: Path) -> None:
    (tmp_path / "wove_config.py").write_text(
        "WOVE_CONFIG = {'default_environment': 'main', 'environments': {'main': {'retries': 4}}}\n"
    )
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    old = os.getcwd()
    os.chdir(nested)
    try:
        settings = wove.config()
    finally:
        os.chdir(old)
    assert settings.default_environment == "main"
    assert settings.resolve("retries", "main") == 4


def test_config_without_arguments_and_no_file_says_what_to_create(tmp_path: Path) -> None:
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ConfigError, match="wove_config.py"):
            wove.config()
    finally:
        os.chdir(old)


def test_config_file_without_the_variable_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wove_config.py").write_text("OTHER = 1\n")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ConfigError, match="WOVE_CONFIG"):
            wove.config()
    finally:
        os.chdir(old)


def test_weave_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="error_mode"):
        weave(error_mode="quietly")


def test_inputs_that_collide_with_option_names_go_through_inputs() -> None:
    with weave(inputs={"timeout": 3}) as w:

        @w.do
        def doubled(timeout: int) -> int:
            return timeout * 2

    assert w.result.doubled == 6
