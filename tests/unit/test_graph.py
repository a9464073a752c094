"""Graph validation: every mistake is reported before any task runs, naming the tasks involved."""

from __future__ import annotations

import pytest

from wove import CycleError, DuplicateTaskError, GraphError, MissingDependencyError, weave
from wove.graph import TaskSpec, build_graph


def spec(func, **kw):  # type: ignore[no-untyped-def]
    return TaskSpec.from_function(func, {}, **kw)


def test_dependencies_come_from_parameter_names() -> None:
    def a(x): ...  # type: ignore[no-untyped-def]
    def b(a, x): ...  # type: ignore[no-untyped-def]
    def c(a, b, z=3): ...  # type: ignore[no-untyped-def]

    graph = build_graph([spec(a), spec(b), spec(c)], {"x": 1})
    assert graph.nodes["a"].input_args == ("x",)
    assert graph.nodes["b"].upstream == ("a",)
    assert graph.nodes["c"].upstream == ("a", "b")
    assert graph.downstream["a"] == ("b", "c")
    assert graph.final == "c"


def test_cycle_names_the_tasks_in_order() -> None:
    def a(c): ...  # type: ignore[no-untyped-def]
    def b(a): ...  # type: ignore[no-untyped-def]
    def c(b): ...  # type: ignore[no-untyped-def]

    with pytest.raises(CycleError) as info:
        build_graph([spec(a), spec(b), spec(c)], {})
    assert set(info.value.cycle) == {"a", "b", "c"}
    assert info.value.cycle[0] == info.value.cycle[-1]
    assert "->" in str(info.value)


def test_self_dependency_is_a_cycle() -> None:
    def a(a): ...  # type: ignore[no-untyped-def]

    with pytest.raises(CycleError, match="a -> a"):
        build_graph([spec(a)], {})


def test_long_chain_does_not_hit_recursion_limit() -> None:
    specs = []
    for i in range(5000):
        ns: dict[str, object] = {}
        param = f"t{i - 1}" if i else ""
        exec(f"def t{i}({param}): return 1", ns)
        specs.append(spec(ns[f"t{i}"]))
    graph = build_graph(specs, {})
    assert graph.final == "t4999"


def test_missing_dependency_names_task_parameter_and_known_names() -> None:
    def a(x): ...  # type: ignore[no-untyped-def]
    def b(a, nothing): ...  # type: ignore[no-untyped-def]

    with pytest.raises(MissingDependencyError) as info:
        build_graph([spec(a), spec(b)], {"x": 1})
    message = str(info.value)
    assert "'b'" in message and "'nothing'" in message and "a, x" in message


def test_duplicate_task_names_are_reported() -> None:
    def a(): ...  # type: ignore[no-untyped-def]

    with pytest.raises(DuplicateTaskError, match="'a'"):
        build_graph([spec(a), spec(a)], {})


def test_task_shadowing_an_input_is_reported() -> None:
    def x(): ...  # type: ignore[no-untyped-def]

    with pytest.raises(DuplicateTaskError, match="weave input"):
        build_graph([spec(x)], {"x": 1})


def test_mapped_task_needs_an_item_parameter() -> None:
    def src(): ...  # type: ignore[no-untyped-def]
    def m(src): ...  # type: ignore[no-untyped-def]

    with pytest.raises(GraphError, match="receive each item"):
        build_graph([spec(src), spec(m, map_over="src", mapped=True)], {})


def test_mapped_source_must_exist() -> None:
    def m(item): ...  # type: ignore[no-untyped-def]

    with pytest.raises(MissingDependencyError, match="maps over 'nope'"):
        build_graph([spec(m, map_over="nope", mapped=True)], {})


def test_nothing_runs_when_the_graph_is_invalid() -> None:
    ran: list[str] = []
    with pytest.raises(MissingDependencyError), weave() as w:

        @w.do
        def first() -> int:
            ran.append("first")
            return 1

        @w.do
        def second(first, missing):  # type: ignore[no-untyped-def]
            ran.append("second")

    assert ran == []
