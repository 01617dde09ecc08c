"""Translate KPI filters and aggregations to PostgreSQL, for ``analytics-engine verify``.

Decision: our own translator over the IR that celpy's parser feeds (``_cel.py``), not
``pycel2sql``. Reasons:

* correctness: the SQL must mean exactly what the streaming evaluator (``filters.py``) means,
  including CEL's error semantics. Both back ends here consume the same IR, and CEL errors map
  one-to-one onto SQL NULL (a missing attribute or a value of the wrong JSON type yields NULL, and
  ``AND``/``OR``/``NOT`` then behave like CEL's error-absorbing ``&&``/``||``/``!``). A generic
  CEL->SQL library has its own notion of types and null handling that we would have to audit and
  pin anyway.
* dialect: we need jsonb access with *type-guarded* casts (``jsonb_typeof`` before
  ``::double precision``) so one odd event cannot abort the verify query with a cast error, and
  ``COLLATE "C"`` so string ordering is code point order like CEL.
* types: declared attribute types only pick the SQL cast where one side is an expression; two
  attributes are compared by the JSON types each event holds, as the evaluator does (declared
  types are not enforced on events), and a JSON null compared with an erroring expression errors.
* parameters: we emit ``$n`` placeholders from a caller-chosen offset (asyncpg style) with explicit
  casts so the server never has to guess parameter types.
* licence/deps: no extra dependency; the grammar stays celpy's (Apache-2.0), already a dependency.

Limitations (both back ends raise an error in the first case, which verify should report rather
than hide): numbers beyond ~1e308 overflow in PostgreSQL with an exception while the evaluator
treats the filter as erroring; attribute names are inlined as SQL string literals, which is safe
because CEL identifiers match ``[_a-zA-Z][_a-zA-Z0-9]*``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from analytics_engine.kpi._cel import (
    RESERVED_NAMES,
    And,
    Arith,
    CelType,
    Cmp,
    FilterError,
    Has,
    In,
    Lit,
    Name,
    Neg,
    Node,
    Not,
    Or,
    check,
    infer_type,
    render,
)

__all__ = [
    "DEFAULT_RESERVED_COLUMNS",
    "aggregate_sql",
    "dimension_sql",
    "dimensions_scalar_sql",
    "filter_to_sql",
    "number_sql",
]

DEFAULT_RESERVED_COLUMNS: Final[Mapping[str, str]] = {
    "event": "event_kind",
    "entity_id": "entity_id",
    "version": "version",
}
"""Where the reserved filter names live in the events table."""

_COLUMN_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_IDENT_RE: Final = re.compile(r"^[_a-zA-Z][_a-zA-Z0-9]*$")
_CASTS: Final[Mapping[str, str]] = {"number": "double precision", "string": "text"}
_JSON_TYPES: Final[Mapping[str, str]] = {"number": "number", "string": "string", "bool": "boolean"}


def _column(name: str) -> str:
    if not _COLUMN_RE.match(name):
        raise ValueError(f"not a plain (optionally qualified) column name: {name!r}")
    return name


def _key(name: str) -> str:
    if not _IDENT_RE.match(name):  # pragma: no cover - the CEL lexer guarantees it
        raise FilterError(f"invalid attribute name {name!r}")
    return f"'{name}'"


def filter_to_sql(
    expr: str,
    *,
    attributes_column: str = "attributes",
    types: Mapping[str, str] | None = None,
    param_offset: int = 0,
    reserved_columns: Mapping[str, str] | None = None,
) -> tuple[str, list[Any]]:
    """Translate a filter to a PostgreSQL boolean expression and its parameters.

    The first placeholder is ``$<param_offset + 1>``. ``types`` declares attribute types (as in
    ``EntityTypeDefinition.attributes``); it is only needed when the type of an attribute cannot be
    inferred from the expression (``a == b`` with two attributes). Rows for which the CEL
    evaluator errors get NULL, so use the expression directly in ``WHERE`` (NULL = not matched).
    """
    node = check(expr, types)
    builder = _Builder(
        _column(attributes_column),
        types,
        param_offset,
        {**DEFAULT_RESERVED_COLUMNS, **(reserved_columns or {})},
    )
    sql = builder.emit(node, "bool")
    return sql, builder.params


def number_sql(name: str, *, attributes_column: str = "attributes", exact: bool = True) -> str:
    """The numeric value of an attribute, NULL when missing or not a JSON number.

    ``exact=True`` casts to ``numeric`` (exact decimal, use for sum/avg in verify);
    otherwise ``double precision``."""
    col = _column(attributes_column)
    cast = "numeric" if exact else "double precision"
    return (
        f"(CASE WHEN jsonb_typeof({col}->{_key(name)}) = 'number' "
        f"THEN ({col}->>{_key(name)})::{cast} END)"
    )


def dimension_sql(name: str, *, attributes_column: str = "attributes") -> str:
    """A ``group_by`` attribute as jsonb, JSON null and missing both as SQL NULL (the engine
    groups them together as ``null``)."""
    col = _column(attributes_column)
    return f"NULLIF({col}->{_key(name)}, 'null'::jsonb)"


def dimensions_scalar_sql(names: Sequence[str], *, attributes_column: str = "attributes") -> str:
    """True when no ``group_by`` attribute holds an array or an object: the engine leaves such
    events out of the KPI (a dimension value is a scalar)."""
    col = _column(attributes_column)
    checks = [
        f"coalesce(jsonb_typeof({col}->{_key(name)}), 'null') NOT IN ('array', 'object')"
        for name in names
    ]
    return " AND ".join(checks) or "TRUE"


def aggregate_sql(
    aggregation: str, field: str | None, *, attributes_column: str = "attributes"
) -> str:
    """The SQL aggregate equal to the engine's value for one (window, group).

    Values that are missing or JSON null are ignored; for sum/avg/min/max so are non-numbers.
    ``count`` without a field counts events. ``sum`` of no values is 0; avg/min/max of no values
    are NULL (the engine emits nothing for them). ``sample_count`` is ``count(*)``.
    """
    if aggregation == "count" and field is None:
        return "count(*)"
    if field is None:
        raise ValueError(f"{aggregation} needs a field")
    if aggregation == "count":
        return f"count({dimension_sql(field, attributes_column=attributes_column)})"
    if aggregation == "count_distinct":
        return f"count(DISTINCT {dimension_sql(field, attributes_column=attributes_column)})"
    exact = number_sql(field, attributes_column=attributes_column, exact=True)
    if aggregation == "sum":
        return f"coalesce(sum({exact}), 0)"
    if aggregation == "avg":
        return f"avg({exact})"
    if aggregation in ("min", "max"):
        number = number_sql(field, attributes_column=attributes_column, exact=False)
        return f"{aggregation}({number})"
    raise ValueError(f"unknown aggregation {aggregation!r}")


class _Builder:
    """Emits SQL for IR nodes; ``emit(node, want)`` resolves ``dyn`` attributes to ``want``."""

    def __init__(
        self, col: str, types: Mapping[str, str] | None, offset: int, reserved: Mapping[str, str]
    ) -> None:
        self.col = col
        self.types = types
        self.offset = offset
        self.reserved = {k: _column(v) for k, v in reserved.items()}
        self.params: list[Any] = []

    # -- helpers ---------------------------------------------------------------------------

    def param(self, value: Any, kind: str) -> str:
        self.params.append(value)
        return f"${self.offset + len(self.params)}::{_CASTS[kind]}"

    def type_of(self, node: Node, want: CelType | None) -> CelType:
        actual = infer_type(node, self.types)
        if actual != "dyn":
            return actual
        if want is None or want == "dyn":
            raise FilterError(
                f"cannot infer the type of {render(node)} for SQL; declare the attribute "
                f"types (types=...)"
            )
        return want

    def is_attribute(self, node: Node) -> bool:
        return isinstance(node, Name) and node.name not in RESERVED_NAMES

    def is_json_null(self, node: Node) -> str:
        assert isinstance(node, Name)
        return f"(jsonb_typeof({self.col}->{_key(node.name)}) = 'null')"

    def accessor(self, name: str, kind: CelType) -> str:
        if name in RESERVED_NAMES:
            column = self.reserved[name]
            if name == "version":
                return f"({column})::double precision"
            if name == "entity_id":
                return f"({column})::text"
            return column
        key = f"{self.col}->{_key(name)}"
        text = f"{self.col}->>{_key(name)}"
        if kind == "string":
            value = text
        elif kind == "number":
            value = f"({text})::double precision"
        elif kind == "bool":
            value = f"({text})::boolean"
        else:  # pragma: no cover - type_of never returns other kinds for names
            raise FilterError(f"unsupported attribute type {kind}")
        return f"(CASE WHEN jsonb_typeof({key}) = '{_JSON_TYPES[kind]}' THEN {value} END)"

    # -- emit --------------------------------------------------------------------------------

    def emit(self, node: Node, want: CelType | None) -> str:
        if isinstance(node, Lit):
            return self.literal(node)
        if isinstance(node, Name):
            return self.accessor(node.name, self.type_of(node, want))
        if isinstance(node, Has):
            if node.name in RESERVED_NAMES:
                return "TRUE"
            return f"(({self.col}->{_key(node.name)}) IS NOT NULL)"
        if isinstance(node, Not):
            return f"(NOT {self.emit(node.operand, 'bool')})"
        if isinstance(node, Neg):
            return f"(- {self.emit(node.operand, 'number')})"
        if isinstance(node, And):
            return f"({self.emit(node.left, 'bool')} AND {self.emit(node.right, 'bool')})"
        if isinstance(node, Or):
            return f"({self.emit(node.left, 'bool')} OR {self.emit(node.right, 'bool')})"
        if isinstance(node, Cmp):
            return self.compare(node)
        if isinstance(node, In):
            return self.member(node)
        if isinstance(node, Arith):
            return self.arith(node, want)
        receiver = self.emit(node.receiver, "string")
        argument = self.emit(node.argument, "string")
        if node.method == "startsWith":
            return f"starts_with({receiver}, {argument})"
        if node.method == "endsWith":
            return f"(right({receiver}, char_length({argument})) = {argument})"
        return f"(strpos({receiver}, {argument}) > 0)"

    def literal(self, node: Lit) -> str:
        value = node.value
        if value is None:  # pragma: no cover - null only appears under == / != (handled there)
            return "NULL"
        if isinstance(value, bool):
            return "TRUE" if value else "FALSE"
        if isinstance(value, str):
            return self.param(value, "string")
        return self.param(float(value), "number")

    def compare(self, node: Cmp) -> str:
        left, right = node.left, node.right
        if isinstance(left, Lit) and left.value is None:
            left, right = right, left
        if isinstance(right, Lit) and right.value is None:
            return self.compare_null(left, negate=node.op == "!=")
        if isinstance(left, Name) and self.is_attribute(left) and self.is_attribute(right):
            assert isinstance(right, Name)
            return self.compare_attributes(left.name, right.name, node.op)
        lt, rt = infer_type(left, self.types), infer_type(right, self.types)
        common: CelType | None = lt if lt != "dyn" else (rt if rt != "dyn" else None)
        kind = self.type_of(left, common)
        lhs, rhs = self.emit(left, kind), self.emit(right, kind)
        if node.op not in ("==", "!="):
            collate = ' COLLATE "C"' if kind == "string" else ""
            return f"({lhs}{collate} {node.op} {rhs})"
        sql_op = "=" if node.op == "==" else "<>"
        plain = f"({lhs} {sql_op} {rhs})"
        if self.is_attribute(left):
            attribute, other, other_sql = left, right, rhs
        elif self.is_attribute(right):
            attribute, other, other_sql = right, left, lhs
        else:
            return plain
        # A JSON null attribute equals nothing but null, yet the other side is still evaluated:
        # when it errors (SQL NULL), so does the comparison. Literals and reserved names never do.
        on_null = "TRUE" if node.op == "!=" else "FALSE"
        if not isinstance(other, Lit | Name):
            on_null = f"(CASE WHEN {other_sql} IS NULL THEN NULL ELSE {on_null} END)"
        return f"(CASE WHEN {self.is_json_null(attribute)} THEN {on_null} ELSE {plain} END)"

    def compare_attributes(self, left: str, right: str, op: str) -> str:
        """Two attributes compared by the JSON types each event holds, as the evaluator does
        (declared types are not enforced on events): missing -> error; null equals only null;
        different types -> error; arrays and objects -> error."""
        lhs, rhs = f"{self.col}->{_key(left)}", f"{self.col}->{_key(right)}"
        ltext, rtext = f"{self.col}->>{_key(left)}", f"{self.col}->>{_key(right)}"
        ltype, rtype = f"jsonb_typeof({lhs})", f"jsonb_typeof({rhs})"
        sql_op = {"==": "=", "!=": "<>"}.get(op, op)
        cases = [f"WHEN {lhs} IS NULL OR {rhs} IS NULL THEN NULL"]
        if op in ("==", "!="):
            both_null = f"({ltype} = 'null' AND {rtype} = 'null')"
            if op == "!=":
                both_null = f"(NOT {both_null})"
            cases.append(f"WHEN {ltype} = 'null' OR {rtype} = 'null' THEN {both_null}")
        cases += [
            f"WHEN {ltype} <> {rtype} THEN NULL",
            f"WHEN {ltype} = 'number' THEN "
            f"(({ltext})::double precision {sql_op} ({rtext})::double precision)",
            f"WHEN {ltype} = 'string' THEN (({ltext}) COLLATE \"C\" {sql_op} ({rtext}))",
            f"WHEN {ltype} = 'boolean' THEN (({ltext})::boolean {sql_op} ({rtext})::boolean)",
        ]
        return f"(CASE {' '.join(cases)} END)"

    def compare_null(self, other: Node, *, negate: bool) -> str:
        if isinstance(other, Lit):
            equal = other.value is None
            return "TRUE" if equal is not negate else "FALSE"
        if self.is_attribute(other):
            op = "<>" if negate else "="
            assert isinstance(other, Name)
            return f"(jsonb_typeof({self.col}->{_key(other.name)}) {op} 'null')"
        if isinstance(other, Name):  # reserved: always present, never null
            return "TRUE" if negate else "FALSE"
        value = self.emit(other, None)
        return f"(CASE WHEN {value} IS NULL THEN NULL ELSE {'TRUE' if negate else 'FALSE'} END)"

    def member(self, node: In) -> str:
        operand = node.operand
        if not node.items:
            if self.is_attribute(operand):
                assert isinstance(operand, Name)
                present = f"({self.col}->{_key(operand.name)})"
            else:
                present = self.emit(operand, None)
            return f"(CASE WHEN {present} IS NULL THEN NULL ELSE FALSE END)"
        kind = node.items[0].type
        value = self.emit(operand, kind)
        options = ", ".join(self.literal(item) for item in node.items)
        plain = f"({value} IN ({options}))"
        if self.is_attribute(operand):
            return f"(CASE WHEN {self.is_json_null(operand)} THEN FALSE ELSE {plain} END)"
        return plain

    def arith(self, node: Arith, want: CelType | None) -> str:
        kind = infer_type(node, self.types)
        if kind == "dyn":
            if want not in ("number", "string"):
                raise FilterError(
                    f"cannot infer whether {render(node)} adds numbers or "
                    f"strings; declare the attribute types (types=...)"
                )
            kind = want
        if node.op == "+" and kind == "string":
            return f"({self.emit(node.left, 'string')} || {self.emit(node.right, 'string')})"
        lhs, rhs = self.emit(node.left, "number"), self.emit(node.right, "number")
        if node.op == "/":
            return f"({lhs} / NULLIF({rhs}, 0))"
        return f"({lhs} {node.op} {rhs})"
