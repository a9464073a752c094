"""Shared fixtures: every test starts from the built-in configuration and leaves no runtime behind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import wove
from wove.config import reset

pytest_plugins = [
    "tests.services.fixtures",
    "tests.services.slurm",
    "tests.services.temporal",
    "tests.services.aws_batch",
    "tests.services.kubernetes",
]


@pytest.fixture(autouse=True)
def _fresh_wove() -> Iterator[None]:
    reset()
    yield
    wove.shutdown()
    reset()
