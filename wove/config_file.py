"""The configuration the ``wove`` commands act on: a given ``wove_config.py``, else the nearest one.

The commands read the file into a ``Settings`` snapshot without applying it (``wove.config`` is left alone), and put
the file's folder on ``sys.path`` first, so a config that imports the project's own modules (a custom adapter, a
Celery app) works from any working directory, as it does for the project's own code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from wove.config import CONFIG_FILENAME, CONFIG_VARIABLE, Settings, build_settings, find_config_file, load_config_file
from wove.errors import ConfigError

__all__ = ["load_settings"]


def load_settings(path: str | Path | None = None) -> tuple[Settings, Path]:
    """The validated settings of ``path`` (default: the nearest ``wove_config.py``) and the file they came from.

    Raises ``ConfigError`` when there is no such file or its ``WOVE_CONFIG`` is invalid.
    """
    if path is None:
        found = find_config_file()
        if found is None:
            raise ConfigError(
                f"no {CONFIG_FILENAME} in {Path.cwd()} or its parents: pass --config PATH, or create one defining "
                f"{CONFIG_VARIABLE} = {{...}}"
            )
        file = found
    else:
        file = Path(path).expanduser().resolve()
        if not file.is_file():
            raise ConfigError(f"{path}: no such file (--config needs a Python file defining {CONFIG_VARIABLE})")
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        values = load_config_file(file)
    except ConfigError:
        raise
    except Exception as exc:  # the file itself failed: a SyntaxError, an ImportError of the project's module
        raise ConfigError(f"{file} failed to load: {type(exc).__name__}: {exc}") from exc
    try:
        return build_settings(**values), file
    except TypeError as exc:  # a key wove.config does not take
        raise ConfigError(f"{file}: {CONFIG_VARIABLE} is not valid for wove.config: {exc}") from exc
