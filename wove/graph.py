"""The task graph of one weave: tasks, the dependencies their parameter names imply, and validation.

Everything here runs before any task does, so a mistake in the graph (a cycle, a parameter that names nothing,
two tasks with one name) is reported with the names involved and nothing has started.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wove.errors import CycleError, DuplicateTaskError, GraphError, MissingDependencyError


@dataclass(frozen=True)
class TaskSpec:
    """One declared task: its function, how it maps, and the options given to ``@w.do``."""

    name: str
    func: Callable[..., Any]
    params: tuple[str, ...]
    optional: frozenset[str]
    is_async: bool
    options: Mapping[str, Any] = field(default_factory=dict)
    map_over: str | Iterable[Any] | None = None
    mapped: bool = False

    @classmethod
    def from_function(
        cls,
        func: Callable[..., Any],
        options: Mapping[str, Any],
        *,
        map_over: str | Iterable[Any] | None = None,
        mapped: bool = False,
    ) -> TaskSpec:
        """Inspect ``func``'s signature; ``*args``/``**kwargs`` are ignored, defaults make a parameter optional."""
        if not callable(func):
            raise GraphError(f"@w.do needs a function, got {func!r}")
        name = getattr(func, "__name__", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise GraphError(f"task {func!r} needs a __name__ that is a valid identifier")
        params, optional = _parameters(func, name)
        is_async = inspect.iscoroutinefunction(func)
        return cls(name, func, params, optional, is_async, dict(options), map_over, mapped)


def _parameters(func: Callable[..., Any], name: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """Parameter names and which have defaults. Plain functions are read off their code object, which is
    ten times cheaper than ``inspect.signature`` and matters for weaves of thousands of tasks."""
    code = getattr(func, "__code__", None)
    if inspect.isfunction(func) and code is not None and not code.co_posonlyargcount:
        positional = code.co_varnames[: code.co_argcount]
        keyword_only = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
        defaults = func.__defaults__ or ()
        optional = set(positional[len(positional) - len(defaults) :]) if defaults else set()
        optional.update(func.__kwdefaults__ or ())
        return positional + keyword_only, frozenset(optional)
    params: list[str] = []
    with_default: set[str] = set()
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise GraphError(f"task {name!r}: positional-only parameter {param.name!r} cannot receive a value")
        params.append(param.name)
        if param.default is not param.empty:
            with_default.add(param.name)
    return tuple(params), frozenset(with_default)


@dataclass(frozen=True)
class Node:
    """A task placed in the graph: which tasks and inputs feed which parameters."""

    spec: TaskSpec
    task_args: tuple[str, ...]
    input_args: tuple[str, ...]
    item_param: str | None
    upstream: tuple[str, ...]
    index: int


@dataclass(frozen=True)
class Graph:
    """A validated task graph: nodes by name, downstream edges, and declaration order."""

    nodes: Mapping[str, Node]
    downstream: Mapping[str, tuple[str, ...]]
    order: tuple[str, ...]

    @property
    def final(self) -> str | None:
        """The last declared task, whose value is ``w.result.final``."""
        return self.order[-1] if self.order else None


def _place(spec: TaskSpec, index: int, task_names: set[str], inputs: Mapping[str, Any]) -> Node:
    item_param: str | None = None
    task_args: list[str] = []
    input_args: list[str] = []
    upstream: list[str] = []
    for param in spec.params:
        if param in task_names:
            task_args.append(param)
            upstream.append(param)
        elif param in inputs:
            input_args.append(param)
        elif spec.mapped and item_param is None:
            item_param = param
        elif param not in spec.optional:
            known = sorted((task_names - {spec.name}) | set(inputs))
            raise MissingDependencyError(
                f"task {spec.name!r}: parameter {param!r} names no task and no weave input "
                f"(known: {', '.join(known) or 'none'})"
            )
    if spec.mapped:
        if item_param is None:
            raise GraphError(
                f"mapped task {spec.name!r} needs one parameter that names no task or input, to receive each item"
            )
        if isinstance(spec.map_over, str):
            if spec.map_over in task_names:
                upstream.append(spec.map_over)
            elif spec.map_over not in inputs:
                known = sorted((task_names - {spec.name}) | set(inputs))
                raise MissingDependencyError(
                    f"mapped task {spec.name!r} maps over {spec.map_over!r}, which names no task and no weave input "
                    f"(known: {', '.join(known) or 'none'})"
                )
    return Node(spec, tuple(task_args), tuple(input_args), item_param, tuple(dict.fromkeys(upstream)), index)


def _find_cycle(nodes: Mapping[str, Node]) -> list[str] | None:
    """Iterative depth-first search (graphs of 10,000 chained tasks must not hit the recursion limit)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for root in nodes:
        if root in state:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        state[root] = 1
        while stack:
            name, position = stack[-1]
            upstream = nodes[name].upstream
            if position < len(upstream):
                stack[-1] = (name, position + 1)
                nxt = upstream[position]
                if state.get(nxt) == 1:
                    cycle = [*path[path.index(nxt) :], nxt]
                    cycle.reverse()
                    return cycle
                if nxt not in state:
                    state[nxt] = 1
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                state[name] = 2
                stack.pop()
                path.pop()
    return None


def build_graph(specs: Iterable[TaskSpec], inputs: Mapping[str, Any]) -> Graph:
    """Validate ``specs`` against each other and the weave's ``inputs``; raise ``GraphError`` naming the tasks."""
    specs = list(specs)
    seen: dict[str, TaskSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise DuplicateTaskError(f"two tasks are named {spec.name!r}; task names must be unique within a weave")
        if spec.name in inputs:
            raise DuplicateTaskError(f"task {spec.name!r} has the same name as a weave input; rename one of them")
        seen[spec.name] = spec
    names = set(seen)
    nodes = {spec.name: _place(spec, index, names, inputs) for index, spec in enumerate(specs)}
    cycle = _find_cycle(nodes)
    if cycle is not None:
        raise CycleError(cycle)
    downstream: dict[str, list[str]] = {name: [] for name in nodes}
    for node in nodes.values():
        for up in node.upstream:
            downstream[up].append(node.spec.name)
    return Graph(nodes, {k: tuple(v) for k, v in downstream.items()}, tuple(nodes))
