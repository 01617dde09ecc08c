"""Which SQL `execute_query` accepts (pure).

The real guarantees are PostgreSQL's: a READ ONLY transaction, a role without write privileges,
and the extended protocol refusing more than one statement. This check only turns the obvious
cases into a clear `read_only_violation` before a connection is used.
"""

from __future__ import annotations

import re
from typing import Final

READ_KEYWORDS: Final = frozenset({"select", "with", "values", "table"})
_LEADING_NOISE: Final = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/|\()*", re.DOTALL)
_WORD: Final = re.compile(r"[A-Za-z_]+")


class RejectedStatement(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def first_keyword(sql: str) -> str:
    """The statement's first keyword, lower-cased, past comments and opening parentheses."""
    rest = sql[_LEADING_NOISE.match(sql).end() :]  # type: ignore[union-attr]
    match = _WORD.match(rest)
    return match.group(0).lower() if match else ""


def check_read_statement(sql: str) -> None:
    """Raise `RejectedStatement` unless `sql` starts like a read statement."""
    keyword = first_keyword(sql)
    if not keyword:
        raise RejectedStatement("sql: an SQL statement is required", "invalid_query")
    if keyword not in READ_KEYWORDS:
        raise RejectedStatement(
            "only read statements (SELECT, WITH, VALUES, TABLE) are accepted,"
            f" not {keyword.upper()}",
            "read_only_violation",
        )
