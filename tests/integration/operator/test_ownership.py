"""Which KPIDefinition owns a code that several declare (pure: the kopf index is a mapping)."""

from __future__ import annotations

from typing import Any

from analytics_engine_operator.ownership import (
    Declaration,
    index_entry,
    other_declarations,
    rival_owner,
)

CODE = "orders_count"


def meta(name: str, created: str, *, namespace: str = "team", deleting: bool = False) -> Any:
    value: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{namespace}-{name}",
        "creationTimestamp": created,
    }
    if deleting:
        value["deletionTimestamp"] = "2024-06-01T00:00:00Z"
    return value


def index_of(*metas: Any) -> dict[str, list[Declaration]]:
    index: dict[str, list[Declaration]] = {}
    for m in metas:
        for code, declaration in index_entry({"code": CODE}, m).items():
            index.setdefault(code, []).append(declaration)
    return index


def test_the_oldest_owns_the_code() -> None:
    old, new = meta("b-old", "2024-01-01T00:00:00Z"), meta("a-new", "2024-02-01T00:00:00Z")
    index = index_of(old, new)
    assert rival_owner(index, CODE, old) is None
    owner = rival_owner(index, CODE, new)
    assert owner is not None and owner.name == "b-old"


def test_same_second_is_decided_by_namespace_then_name() -> None:
    created = "2024-01-01T00:00:00Z"
    first, second = meta("z", created, namespace="a"), meta("a", created, namespace="b")
    index = index_of(first, second)
    assert rival_owner(index, CODE, first) is None
    owner = rival_owner(index, CODE, second)
    assert owner is not None and (owner.namespace, owner.name) == ("a", "z")


def test_an_owner_being_deleted_hands_over() -> None:
    old = meta("old", "2024-01-01T00:00:00Z", deleting=True)
    new = meta("new", "2024-02-01T00:00:00Z")
    index = index_of(old, new)
    assert rival_owner(index, CODE, new) is None
    assert [d.name for d in other_declarations(index, CODE, old)] == ["new"]
    assert other_declarations(index, CODE, new) == []


def test_alone_or_without_a_valid_code() -> None:
    only = meta("only", "2024-01-01T00:00:00Z")
    assert rival_owner(index_of(only), CODE, only) is None
    assert rival_owner({}, CODE, only) is None  # not indexed yet
    assert other_declarations(index_of(only), CODE, only) == []
    assert index_entry({"code": "Not-A-Code"}, only) == {}
