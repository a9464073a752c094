"""Every Python example in README.md and docs/ runs as written, or says in the page why it does not run here.

A ```python block runs as a script of its own, in an empty folder. A block that cannot run on its own carries a
marker on the line before its fence:

* ``<!-- docs-example: run by tests/integration/test_rq.py -->``: it needs a running service, and that
  integration test (which starts the service) runs it;
* ``<!-- docs-example: fragment -->``: a piece of a larger program (it names objects defined elsewhere), only
  compiled.

Nothing is skipped silently: an unmarked block runs, a marker that names no existing test, a test that does not
read the page, or an unknown marker fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^```(?:python|py|python3)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"^<!--\s*docs-example:\s*(.*?)\s*-->\s*$")
_RUN_BY = re.compile(r"run by (tests/\S+\.py)")


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    code: str
    marker: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _examples() -> list[Example]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = [row for row in text[: match.start()].splitlines() if row.strip()]
            marker = _MARKER.match(before[-1]) if before else None
            found.append(Example(page, line, match.group(1), marker.group(1) if marker else None))
    return found


EXAMPLES = _examples()


def test_examples_are_found() -> None:
    pages = {example.page.name for example in EXAMPLES}
    assert {"README.md", "getting-started.md", "configuration.md", "rq.md"} <= pages


def test_every_marker_sits_on_a_python_block() -> None:
    marked = {(example.page, example.marker) for example in EXAMPLES if example.marker is not None}
    for page in PAGES:
        for row in page.read_text(encoding="utf-8").splitlines():
            marker = _MARKER.match(row)
            if marker is not None:
                assert (page, marker.group(1)) in marked, f"{page.name}: {row} is not right before a python block"


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.name for example in EXAMPLES])
def test_example(example: Example, tmp_path: Path) -> None:
    compile(example.code, example.name, "exec")  # every block at least parses
    if example.marker == "fragment":
        return
    if example.marker is not None:
        run_by = _RUN_BY.fullmatch(example.marker)
        assert run_by is not None, f"{example.name}: unknown marker {example.marker!r}"
        test = ROOT / run_by.group(1)
        assert test.is_file(), f"{example.name}: {run_by.group(1)} does not exist"
        assert example.page.name in test.read_text(encoding="utf-8"), f"{test.name} does not run {example.page.name}"
        return
    script = tmp_path / "example.py"
    script.write_text(example.code, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("WOVE_")}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{example.name} failed:\n{done.stderr}"
