"""Parse the supported CEL subset into a small, typed IR.

Why an IR of our own instead of running celpy's evaluator: celpy's interpreter does ~3k
evaluations/s (measured), two orders of magnitude below what the calculation engine needs, and
its strict int/double overloads (``amount > 0.5`` is an error for ``amount == 2``) match neither
the JSON number model nor the SQL translation. So celpy's
*parser* (its Lark grammar, i.e. the real CEL syntax) produces the parse tree, and this module
lowers it into a tiny IR that both the Python evaluator (``filters.py``) and the SQL translator
(``sql.py``) consume. One IR, two back ends: the streaming path and ``analytics-engine verify``
cannot disagree about what a filter means.

The subset (anything else is a ``FilterError`` at compile time):

* literals: numbers (int/uint/double, all treated as IEEE doubles), strings, ``true``/``false``,
  ``null`` (only as an operand of ``==``/``!=``), list literals of literals (only right of ``in``)
* names: event attributes (top-level variables) and the reserved ``event``, ``entity_id``,
  ``version``
* ``== != < <= > >=``, ``&& || !``, ``x in [..]``, ``has(name)``,
  ``s.startsWith(t)``, ``s.endsWith(t)``, ``s.contains(t)``, arithmetic ``+ - * /`` and unary ``-``,
  string concatenation with ``+``

Semantics (documented deviations from full CEL): numbers are doubles as in JSON (``5 / 2 == 2.5``,
``1 == 1.0``); comparing values of different types is an *error* (not ``false``), except ``x ==
null`` / ``x != null`` which never error for a present value; errors propagate like SQL NULL and
are absorbed by ``&&``/``||`` exactly as in CEL (``error || true == true``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from celpy.celparser import CELParseError, CELParser
from celpy.evaluation import celstr
from lark import Token, Tree

MAX_EXPRESSION_LENGTH: Final = 4096
"""Longest accepted filter text (characters)."""

MAX_TREE_DEPTH: Final = 250
"""Deepest accepted parse tree (Lark levels; one parenthesis costs ~10). Keeps the recursive
lowering, the evaluator closures and the SQL text far from Python's recursion limit."""

RESERVED_NAMES: Final = frozenset({"event", "entity_id", "version"})

CelType: TypeAlias = Literal["bool", "number", "string", "null", "list", "dyn"]

RESERVED_TYPES: Final[Mapping[str, CelType]] = {
    "event": "string",
    "entity_id": "string",
    "version": "number",
}

ATTRIBUTE_TO_CEL: Final[Mapping[str, CelType]] = {
    "string": "string",
    "timestamp": "string",
    "integer": "number",
    "number": "number",
    "boolean": "bool",
}
"""Maps ``EntityTypeDefinition`` attribute types (and plain CEL type names) to IR types."""

CmpOp: TypeAlias = Literal["==", "!=", "<", "<=", ">", ">="]
ArithOp: TypeAlias = Literal["+", "-", "*", "/"]
StrMethod: TypeAlias = Literal["startsWith", "endsWith", "contains"]
Scalar: TypeAlias = float | str | bool | None


class FilterError(ValueError):
    """A filter expression that does not parse, is outside the supported subset, or is
    ill-typed. The message is meant for humans (shown next to the ``filter`` form field)."""


@dataclass(frozen=True, slots=True)
class Lit:
    value: Scalar

    @property
    def type(self) -> CelType:
        v = self.value
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, str):
            return "string"
        return "number"


@dataclass(frozen=True, slots=True)
class Name:
    name: str


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Or:
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Cmp:
    op: CmpOp
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class In:
    operand: Node
    items: tuple[Lit, ...]


@dataclass(frozen=True, slots=True)
class Has:
    name: str


@dataclass(frozen=True, slots=True)
class Arith:
    op: ArithOp
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class StrCall:
    method: StrMethod
    receiver: Node
    argument: Node


Node: TypeAlias = Lit | Name | Not | Neg | And | Or | Cmp | In | Has | Arith | StrCall

_CMP_RULES: Final[Mapping[str, CmpOp]] = {
    "relation_eq": "==",
    "relation_ne": "!=",
    "relation_lt": "<",
    "relation_le": "<=",
    "relation_gt": ">",
    "relation_ge": ">=",
}
_ARITH_RULES: Final[Mapping[str, ArithOp]] = {
    "addition_add": "+",
    "addition_sub": "-",
    "multiplication_mul": "*",
    "multiplication_div": "/",
}
_STR_METHODS: Final = frozenset({"startsWith", "endsWith", "contains"})
_UNSUPPORTED_RULES: Final[Mapping[str, str]] = {
    "member_dot": "field selection (a.b)",
    "member_index": "indexing (a[i])",
    "member_object": "message construction",
    "dot_ident": "qualified names (.a)",
    "dot_ident_arg": "qualified function calls",
    "map_lit": "map literals",
    "multiplication_mod": "the '%' operator",
}


def parse(expr: str) -> Node:
    """Parse CEL text into the IR (no type checking; see :func:`infer_type`)."""
    if not isinstance(expr, str):
        raise FilterError("filter must be a string")
    if not expr.strip():
        raise FilterError("filter is empty")
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise FilterError(
            f"filter is too long ({len(expr)} characters, at most {MAX_EXPRESSION_LENGTH})"
        )
    if "\x00" in expr:
        raise FilterError("filter contains a NUL character")
    try:
        tree = CELParser().parse(expr)
    except CELParseError as exc:
        where = f" at line {exc.line}, column {exc.column}" if exc.line else ""
        first = str(exc.args[0]).strip().splitlines() if exc.args else []
        context = f":\n{chr(10).join(first)}" if first else ""
        raise FilterError(f"syntax error{where}{context}") from None
    except RecursionError:  # pragma: no cover - Lark's LALR parser is iterative
        raise FilterError("filter is nested too deeply") from None
    _check_depth(tree)
    try:
        return _lower(tree)
    except RecursionError:  # pragma: no cover - guarded by _check_depth
        raise FilterError("filter is nested too deeply") from None


def _check_depth(tree: Tree[Token]) -> None:
    """Iteratively bound the parse tree depth before any recursive walk."""
    stack: list[tuple[Tree[Token] | Token, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            raise FilterError(
                "filter is too complex: too deeply nested or too many chained operators"
            )
        if isinstance(node, Tree):
            stack.extend((child, depth + 1) for child in node.children)


def _column(tree: Tree[Token]) -> str:
    meta = getattr(tree, "_meta", None)
    column = getattr(meta, "column", None) if meta is not None else None
    return f" at column {column}" if column else ""


def _subtrees(tree: Tree[Token]) -> list[Tree[Token]]:
    return [c for c in tree.children if isinstance(c, Tree)]


def _lower(tree: Tree[Token]) -> Node:
    rule = str(tree.data)
    kids = tree.children
    if rule in _UNSUPPORTED_RULES:
        raise FilterError(f"{_UNSUPPORTED_RULES[rule]} is not supported{_column(tree)}")
    if rule == "expr":
        if len(kids) != 1:
            raise FilterError(
                f"the conditional operator (a ? b : c) is not supported{_column(tree)}"
            )
        return _lower(_subtrees(tree)[0])
    if rule in ("conditionalor", "conditionaland"):
        subs = _subtrees(tree)
        if len(subs) == 1:
            return _lower(subs[0])
        left, right = _lower(subs[0]), _lower(subs[1])
        return Or(left, right) if rule == "conditionalor" else And(left, right)
    if rule == "relation":
        return _lower_relation(tree)
    if rule in ("addition", "multiplication"):
        subs = _subtrees(tree)
        if len(subs) == 1:
            return _lower(subs[0])
        op_tree, rhs = subs
        op_rule = str(op_tree.data)
        if op_rule not in _ARITH_RULES:
            raise FilterError(
                f"{_UNSUPPORTED_RULES.get(op_rule, op_rule)} is not supported{_column(tree)}"
            )
        return Arith(_ARITH_RULES[op_rule], _lower(_subtrees(op_tree)[0]), _lower(rhs))
    if rule == "unary":
        subs = _subtrees(tree)
        if len(subs) == 1:
            return _lower(subs[0])
        operand = _lower(subs[1])
        if str(subs[0].data) == "unary_not":
            return Not(operand)
        if isinstance(operand, Lit) and operand.type == "number":
            assert isinstance(operand.value, float)
            return Lit(-operand.value)
        return Neg(operand)
    if rule in ("member", "primary", "paren_expr"):
        return _lower(_subtrees(tree)[0])
    if rule == "member_dot_arg":
        return _lower_method(tree)
    if rule == "ident":
        return Name(str(kids[0]))
    if rule == "ident_arg":
        return _lower_call(tree)
    if rule == "literal":
        return _lower_literal(tree)
    if rule == "list_lit":
        raise FilterError(f"list literals are only supported right of 'in'{_column(tree)}")
    raise FilterError(f"unsupported construct '{rule}'{_column(tree)}")  # pragma: no cover


def _lower_relation(tree: Tree[Token]) -> Node:
    subs = _subtrees(tree)
    if len(subs) == 1:
        return _lower(subs[0])
    op_tree, rhs_tree = subs
    lhs = _lower(_subtrees(op_tree)[0])
    op_rule = str(op_tree.data)
    if op_rule == "relation_in":
        return In(lhs, _lower_list(rhs_tree))
    return Cmp(_CMP_RULES[op_rule], lhs, _lower(rhs_tree))


def _unwrap(tree: Tree[Token]) -> Tree[Token]:
    """Descend single-child wrapper rules down to the interesting node."""
    node = tree
    while str(node.data) in (
        "expr",
        "conditionalor",
        "conditionaland",
        "relation",
        "addition",
        "multiplication",
        "unary",
        "member",
        "primary",
    ):
        subs = _subtrees(node)
        if len(subs) != 1:
            break
        node = subs[0]
    return node


def _lower_list(tree: Tree[Token]) -> tuple[Lit, ...]:
    node = _unwrap(tree)
    if str(node.data) != "list_lit":
        raise FilterError(
            f"'in' needs a list literal on its right, e.g. x in ['a', 'b']{_column(tree)}"
        )
    subs = _subtrees(node)
    items: list[Lit] = []
    for expr in _subtrees(subs[0]) if subs else []:
        item = _lower(expr)
        if not isinstance(item, Lit) or item.type == "null":
            raise FilterError(
                f"'in' lists may only hold number, string or boolean literals{_column(tree)}"
            )
        items.append(item)
    if len({i.type for i in items}) > 1:
        raise FilterError(f"'in' list mixes types{_column(tree)}")
    return tuple(items)


def _args(tree: Tree[Token]) -> list[Tree[Token]]:
    lists = [c for c in _subtrees(tree) if str(c.data) == "exprlist"]
    return _subtrees(lists[0]) if lists else []


def _lower_call(tree: Tree[Token]) -> Node:
    name = str(tree.children[0])
    args = _args(tree)
    if name != "has":
        raise FilterError(f"function '{name}()' is not supported{_column(tree)}")
    if len(args) != 1:
        raise FilterError(f"has() takes exactly one attribute name{_column(tree)}")
    arg = _lower(args[0])
    if not isinstance(arg, Name):
        raise FilterError(f"has() takes an attribute name, e.g. has(amount){_column(tree)}")
    return Has(arg.name)


def _lower_method(tree: Tree[Token]) -> Node:
    receiver_tree = _subtrees(tree)[0]
    method = next(str(c) for c in tree.children if isinstance(c, Token))
    if method not in _STR_METHODS:
        raise FilterError(
            f"method '.{method}()' is not supported (supported: "
            f"{', '.join(sorted(_STR_METHODS))}){_column(tree)}"
        )
    args = _args(tree)
    if len(args) != 1:
        raise FilterError(f".{method}() takes exactly one argument{_column(tree)}")
    return StrCall(method, _lower(receiver_tree), _lower(args[0]))  # type: ignore[arg-type]


def _lower_literal(tree: Tree[Token]) -> Lit:
    token = tree.children[0]
    assert isinstance(token, Token)
    kind, text = token.type, str(token)
    if kind in ("INT_LIT", "UINT_LIT"):
        digits = text.rstrip("uU")
        negative = digits.startswith("-")
        digits = digits.lstrip("-")
        value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits)
        try:
            return Lit(float(-value if negative else value))
        except OverflowError:
            raise FilterError(f"number {text} is out of range{_column(tree)}") from None
    if kind == "FLOAT_LIT":
        number = float(text)
        if number in (float("inf"), float("-inf")):
            raise FilterError(f"number {text} is out of range{_column(tree)}")
        return Lit(number)
    if kind in ("STRING_LIT", "MLSTRING_LIT"):
        return Lit(_decode_string(token, tree))
    if kind == "BOOL_LIT":
        return Lit(text == "true")
    if kind == "NULL_LIT":
        return Lit(None)
    raise FilterError(
        f"{kind.replace('_LIT', '').lower()} literals are not supported{_column(tree)}"
    )


def _decode_string(token: Token, tree: Tree[Token]) -> str:
    try:
        value = str(celstr(token))
        value.encode("utf-8")
    except (ValueError, UnicodeError):
        raise FilterError(f"invalid escape sequence in string literal{_column(tree)}") from None
    if "\x00" in value:
        raise FilterError(f"string literals may not contain NUL{_column(tree)}")
    return value


# --------------------------------------------------------------------------------------------
# names and static types


def names_of(node: Node) -> set[str]:
    """Every variable name the expression reads (attributes and reserved names)."""
    found: set[str] = set()
    stack: list[Node] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Name | Has):
            found.add(n.name)
        elif isinstance(n, Not | Neg):
            stack.append(n.operand)
        elif isinstance(n, And | Or | Cmp | Arith):
            stack.extend((n.left, n.right))
        elif isinstance(n, In):
            stack.append(n.operand)
        elif isinstance(n, StrCall):
            stack.extend((n.receiver, n.argument))
    return found


def name_type(name: str, types: Mapping[str, str] | None) -> CelType:
    if name in RESERVED_TYPES:
        return RESERVED_TYPES[name]
    if types is not None and name in types:
        declared = types[name]
        if declared not in ATTRIBUTE_TO_CEL:
            raise FilterError(f"unknown type {declared!r} declared for {name!r}")
        return ATTRIBUTE_TO_CEL[declared]
    return "dyn"


def render(node: Node) -> str:
    """Human-readable CEL text for a node (for error messages)."""
    if isinstance(node, Lit):
        if node.value is None:
            return "null"
        if isinstance(node.value, bool):
            return "true" if node.value else "false"
        if isinstance(node.value, str):
            return repr(node.value)
        return repr(node.value).removesuffix(".0")
    if isinstance(node, Name):
        return node.name
    if isinstance(node, Has):
        return f"has({node.name})"
    if isinstance(node, Not):
        return f"!{render(node.operand)}"
    if isinstance(node, Neg):
        return f"-{render(node.operand)}"
    if isinstance(node, And):
        return f"({render(node.left)} && {render(node.right)})"
    if isinstance(node, Or):
        return f"({render(node.left)} || {render(node.right)})"
    if isinstance(node, Cmp | Arith):
        return f"({render(node.left)} {node.op} {render(node.right)})"
    if isinstance(node, In):
        return f"{render(node.operand)} in [{', '.join(render(i) for i in node.items)}]"
    return f"{render(node.receiver)}.{node.method}({render(node.argument)})"


def infer_type(node: Node, types: Mapping[str, str] | None = None) -> CelType:
    """Static type of ``node``; raises :class:`FilterError` on a provable type error.

    Attribute names without a declared type are ``dyn`` and checked at evaluation time.
    """
    if isinstance(node, Lit):
        return node.type
    if isinstance(node, Name):
        return name_type(node.name, types)
    if isinstance(node, Has):
        return "bool"
    if isinstance(node, Not):
        _expect(node.operand, ("bool",), "'!'", types)
        return "bool"
    if isinstance(node, Neg):
        _expect(node.operand, ("number",), "unary '-'", types)
        return "number"
    if isinstance(node, And | Or):
        op = "'&&'" if isinstance(node, And) else "'||'"
        _expect(node.left, ("bool",), op, types)
        _expect(node.right, ("bool",), op, types)
        return "bool"
    if isinstance(node, Cmp):
        left, right = infer_type(node.left, types), infer_type(node.right, types)
        if node.op in ("==", "!="):
            if "null" in (left, right):
                return "bool"
            allowed: tuple[CelType, ...] = ("bool", "number", "string")
        else:
            if "null" in (left, right):
                raise FilterError(f"null can only be compared with == or != in {render(node)}")
            allowed = ("bool", "number", "string")
        for side in (left, right):
            if side not in (*allowed, "dyn"):
                raise FilterError(f"cannot compare a {side} in {render(node)}")
        if "dyn" not in (left, right) and left != right:
            raise FilterError(f"cannot compare {left} with {right} in {render(node)}")
        return "bool"
    if isinstance(node, In):
        operand = infer_type(node.operand, types)
        if operand not in ("bool", "number", "string", "dyn"):
            raise FilterError(
                f"'in' needs a number, string or boolean on its left in {render(node)}"
            )
        if node.items and operand != "dyn" and node.items[0].type != operand:
            raise FilterError(
                f"cannot look up a {operand} in a list of {node.items[0].type}s in {render(node)}"
            )
        return "bool"
    if isinstance(node, Arith):
        left, right = infer_type(node.left, types), infer_type(node.right, types)
        numeric_or_text = ("number", "string", "dyn") if node.op == "+" else ("number", "dyn")
        for side in (left, right):
            if side not in numeric_or_text:
                what = "'+'" if node.op == "+" else f"'{node.op}' (numbers only)"
                raise FilterError(f"cannot apply {what} to a {side} in {render(node)}")
        if "dyn" not in (left, right) and left != right:
            raise FilterError(f"cannot add {left} and {right} in {render(node)}")
        if node.op != "+":
            return "number"
        known = {left, right} - {"dyn"}
        return known.pop() if known else "dyn"
    _expect(node.receiver, ("string",), f"'.{node.method}()'", types)
    _expect(node.argument, ("string",), f"'.{node.method}()'", types)
    return "bool"


def _expect(
    node: Node, wanted: tuple[CelType, ...], what: str, types: Mapping[str, str] | None
) -> None:
    actual = infer_type(node, types)
    if actual == "dyn" and isinstance(node, Arith) and "bool" in wanted:
        raise FilterError(f"{what} needs a bool, got arithmetic: {render(node)}")
    if actual != "dyn" and actual not in wanted:
        raise FilterError(f"{what} needs a {' or '.join(wanted)}, got a {actual}: {render(node)}")


def check(expr: str, types: Mapping[str, str] | None = None) -> Node:
    """Parse and type-check a filter; the whole expression must be boolean."""
    node = parse(expr)
    result = infer_type(node, types)
    if result == "dyn" and isinstance(node, Arith):
        result = "number or string"  # type: ignore[assignment]
    if result not in ("bool", "dyn"):
        raise FilterError(f"a filter must be a boolean expression, this one is a {result}")
    return node
