"""A griffe extension for the API reference: Sphinx cross-reference roles in docstrings become inline code.

wove's docstrings name other objects the reStructuredText way (``:func:`run_backend_payload```); Markdown would
show the role literally, so ``:role:`target``` turns into `` `target` `` (``~a.b`` into `` `b` ``) before rendering.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|exc|data|obj|const):`~?([^`]+)`")
#: reStructuredText's literal-block marker: a paragraph of its own (dropped) or a line's trailing ``::`` (one colon).
_LONE_MARKER = re.compile(r"^[ \t]*::[ \t]*$", re.M)
_TRAILING_MARKER = re.compile(r"(?<=\S)::[ \t]*$", re.M)


def _code(match: re.Match[str]) -> str:
    target = match.group(1)
    if match.group(0).split("`", 1)[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRoles(griffe.Extension):
    """Rewrites each loaded object's docstring once, as griffe builds it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(_code, obj.docstring.value)
            obj.docstring.value = _TRAILING_MARKER.sub(":", _LONE_MARKER.sub("", text))
