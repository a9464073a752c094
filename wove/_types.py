"""Shared type aliases: the frame that crosses every executor seam."""

from __future__ import annotations

from typing import Any

#: A command or event exchanged with an executor. Commands: ``run_task``, ``cancel_task``, ``shutdown``.
#: Events: ``task_started``, ``heartbeat``, ``task_result``, ``task_error``, ``task_cancelled``.
Frame = dict[str, Any]

#: Event frame types that end a run.
TERMINAL_EVENTS = frozenset({"task_result", "task_error", "task_cancelled"})

#: Every event frame type an executor may emit.
EVENT_TYPES = frozenset({"task_started", "heartbeat"}) | TERMINAL_EVENTS

#: Every command frame type an executor accepts.
COMMAND_TYPES = frozenset({"run_task", "cancel_task", "shutdown"})
