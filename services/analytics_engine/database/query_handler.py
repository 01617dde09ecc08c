"""QueryRequestHandler: the `database.query` and `database.command` request types.

`database.query` (read-only role, `DATABASE_READONLY_URL`):
- `execute_query {sql, params?, max_rows?}` -> `{columns, rows, row_count, truncated}`
- `kpi_history {kpi_code, start, end, dimensions?, limit?}` -> `{rows: [result...], truncated}`:
  results with `start <= window_start < end`, oldest first; `dimensions` filters by containment
  (`{"region": "eu"}` matches every group whose region is eu). A result superseded by a newer
  definition version (one beginning at or before its window) is left out.
- `latest_kpi_values {kpi_code?}` -> `{rows: [result...], truncated}`: the latest window per KPI
  and group, of the KPI's newest definition version that has results. Both stop at about 4 MB
  of JSON (`truncated`), so a reply always fits a message.
- `get_entity {entity_type, entity_id}` -> `{entity: {...} | null}`.
- `list_entities {entity_type, active?, after?, limit?}` -> `{rows: [entity...], next_after}`:
  the entities of one type by `entity_id` (ids greater than `after`), active or inactive ones
  only when `active` is given; `limit` default 100, at most `ENTITY_PAGE_LIMIT`. `next_after`,
  the last row's id when the page is full or stopped at about 4 MB (null otherwise), asks for
  the next page: keyset pagination on the primary key, as fast on the last page as on the first.

`database.command` (writer role):
- `purge_kpi_results {kpi_code}` -> `{deleted}`: when a KPI is deleted or redefined.
- `request_archival {older_than?}` -> `{batches, rows}`: run retention now for events older
  than `older_than` (a duration, default `DATABASE_RETENTION`).
- `record_kpi_version {kpi_code, definition_version, since}` -> `{kpi_code, definition_version,
  since}` (`since`: where the version begins now, the earlier of the stored one and this):
  results of older versions from `since` on are superseded (`kpi_result_versions`). Results
  usually say it themselves (their windows, `version_since`); the calculation engine sends this
  when a backfill recomputed a KPI's history and found no window to publish, so nothing else
  would tell the database that the old version's results there no longer stand.

Errors are `HandlerError` codes: `invalid_query`, `read_only_violation`, `query_timeout`,
`invalid_request`, `forbidden` (`execute_query` from a service not in
`DATABASE_EXECUTE_QUERY_CALLERS`); an outage is `TransientError` (reply code `unavailable`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any, Final

import asyncpg
import orjson

from analytics_engine.core.durations import parse_duration
from analytics_engine.core.envelopes import Request
from analytics_engine.core.errors import HandlerError
from analytics_engine.core.payloads import ENTITY_PAGE_DEFAULT, ENTITY_PAGE_LIMIT
from analytics_engine.core.request_reply import REPLY_PREFIX
from analytics_engine.core.storable import InvalidPayload, parse_timestamp
from analytics_engine.database.db import transient_errors
from analytics_engine.database.jsonsafe import coerce_param, row_to_json, to_json_value
from analytics_engine.database.kpi_result_consumer import RECORD_VERSIONS
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.model import KPI_CODE
from analytics_engine.database.sqlguard import RejectedStatement, check_read_statement
from analytics_engine.kpi.history_query import HISTORY_LIMIT

MAX_SQL_LENGTH: Final = 100_000
MAX_PARAMS: Final = 1000

_RESULT_COLUMNS: Final = (
    "kpi_code, window_start, window_end, dimensions, value, sample_count, definition_version,"
    " computed_at, stored_at"
)

_ENTITY_COLUMNS: Final = (
    "entity_type, entity_id, version, attributes, active, created_at, updated_at,"
    " deactivated_at, deactivation_reason, last_event_id"
)

LIST_ENTITIES: Final = (
    f"SELECT {_ENTITY_COLUMNS} FROM entities WHERE entity_type = $1 AND entity_id > $2"
    " AND ($3::boolean IS NULL OR active = $3) ORDER BY entity_id LIMIT $4"
)
"""`list_entities`: a range scan of the primary key (`entity_type, entity_id`) from `$2`, ''
for the first page (every id sorts after it). Not `($2 IS NULL OR entity_id > $2)`: a generic
plan cannot make that OR an index condition, and would read every earlier id of the type
again for each page."""

# A result `r` of an older definition version than one that begins at or before its window
# (`kpi_result_versions`): the KPI was recomputed from there under the newer definition, whose
# windows and groups may differ from the old ones, so both would be history for the same time.
_NOT_SUPERSEDED: Final = (
    "NOT EXISTS (SELECT 1 FROM kpi_result_versions v WHERE v.kpi_code = r.kpi_code"
    " AND v.definition_version > r.definition_version AND v.since <= r.window_start)"
)
# A result `r` of its KPI's newest definition version that has results: the latest values are
# the current definition's, not those of groups an earlier one had (another `group_by`).
_OF_NEWEST_VERSION: Final = (
    "NOT EXISTS (SELECT 1 FROM kpi_result_versions v WHERE v.kpi_code = r.kpi_code"
    " AND v.definition_version > r.definition_version)"
)

# SQLSTATEs that mean "you tried to write" (read-only transaction, missing privilege).
_WRITE_DENIED: Final = {"25006", "42501"}


def _payload_str(payload: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise HandlerError(f"{name}: a non-empty string is required", code="invalid_request")
    if "\x00" in value:  # PostgreSQL text cannot hold it: refused, not an internal error
        raise HandlerError(f"{name}: contains a NUL character", code="invalid_request")
    return value


def _payload_int(payload: Mapping[str, Any], name: str, default: int, maximum: int) -> int:
    value = payload.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HandlerError(f"{name}: a positive integer is required", code="invalid_request")
    return min(value, maximum)


def _result_json(record: Any) -> dict[str, Any]:
    return {key: to_json_value(record[key]) for key in record.keys()}  # noqa: SIM118


FETCH_PAGE = 500


class ReplyBudget:
    """The rows of one reply, up to about `max_bytes` of JSON: a reply over Redis's message
    limit would never be delivered, and its caller would wait out its timeout."""

    def __init__(self, max_bytes: int) -> None:
        self.rows: list[Any] = []
        self._left = max_bytes

    def add(self, row: Any) -> bool:
        """Keep `row` if it fits; False, keeping nothing more, once the budget is spent."""
        self._left -= len(orjson.dumps(row, default=str))
        if self._left < 0:
            return False
        self.rows.append(row)
        return True


class QueryRequestHandler:
    def __init__(
        self,
        *,
        reader_pool: Callable[[], Any],
        writer_pool: Callable[[], Any],
        query_timeout: timedelta,
        max_rows: int,
        max_bytes: int = 4 * 1024 * 1024,
        execute_query_callers: Collection[str],
        metrics: DatabaseMetrics,
        request_archival: Callable[[timedelta | None], Awaitable[dict[str, int]]],
    ) -> None:
        self._reader = reader_pool
        self._writer = writer_pool
        self._timeout = query_timeout.total_seconds()
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._sql_callers = frozenset(execute_query_callers)
        self._metrics = metrics
        self._request_archival = request_archival

    def query_handlers(self) -> dict[str, Callable[[Request], Awaitable[Mapping[str, Any]]]]:
        return {
            "execute_query": self.execute_query,
            "kpi_history": self.kpi_history,
            "latest_kpi_values": self.latest_kpi_values,
            "get_entity": self.get_entity,
            "list_entities": self.list_entities,
        }

    def command_handlers(self) -> dict[str, Callable[[Request], Awaitable[Mapping[str, Any]]]]:
        return {
            "purge_kpi_results": self.purge_kpi_results,
            "request_archival": self.request_archival,
            "record_kpi_version": self.record_kpi_version,
        }

    # -- execute_query -----------------------------------------------------------------------
    async def execute_query(self, request: Request) -> dict[str, Any]:
        self._check_sql_caller(request.reply_to)
        payload = request.payload
        sql = payload.get("sql")
        if not isinstance(sql, str) or not sql.strip():
            raise HandlerError("sql: a non-empty string is required", code="invalid_query")
        if len(sql) > MAX_SQL_LENGTH:
            raise HandlerError(
                f"sql: longer than {MAX_SQL_LENGTH} characters", code="invalid_query"
            )
        params = payload.get("params") or []
        if not isinstance(params, list) or len(params) > MAX_PARAMS:
            raise HandlerError(
                f"params: a list of at most {MAX_PARAMS} values is required", code="invalid_query"
            )
        max_rows = _payload_int(payload, "max_rows", self._max_rows, self._max_rows)
        try:
            check_read_statement(sql)
        except RejectedStatement as exc:
            raise HandlerError(str(exc), code=exc.code) from None
        started = time.perf_counter()
        try:
            return await self._run_read(sql, params, max_rows)
        finally:
            self._metrics.queries.labels("execute_query").observe(time.perf_counter() - started)

    def _check_sql_caller(self, reply_to: str) -> None:
        """Only the listed services get answers to arbitrary SQL. The caller is the service
        of `reply_to` (`reply.{service}.{instance}`), which no other service's ACL user may
        subscribe to: naming another service's channel gets the answer sent where it cannot
        read it."""
        if "*" in self._sql_callers:
            return
        service = reply_to.removeprefix(REPLY_PREFIX).split(".", 1)[0]
        if service not in self._sql_callers:
            raise HandlerError(
                f"execute_query is not allowed for {service!r}: only "
                f"{', '.join(sorted(self._sql_callers))} (DATABASE_EXECUTE_QUERY_CALLERS)",
                code="forbidden",
            )

    async def _run_read(self, sql: str, params: list[Any], max_rows: int) -> dict[str, Any]:
        timeout_ms = max(1, int(self._timeout * 1000))
        try:
            with transient_errors("execute_query"):
                async with self._reader().acquire(timeout=self._timeout) as conn:
                    # One deadline for the whole read. PostgreSQL's statement_timeout alone
                    # restarts with every page the cursor fetches, and the query itself may
                    # turn it off (`set_config`) for the pages after the first.
                    try:
                        async with asyncio.timeout(self._timeout):
                            columns, rows, truncated = await self._read(
                                conn, sql, params, max_rows, timeout_ms
                            )
                    except TimeoutError:
                        raise self._timed_out() from None
        except InvalidPayload as exc:
            raise HandlerError(str(exc), code="invalid_query") from None
        except orjson.JSONDecodeError as exc:  # jsonb PostgreSQL holds but JSON doubles cannot
            raise HandlerError(
                f"a json value in the result cannot be read as JSON: {exc}", code="invalid_query"
            ) from None
        except asyncpg.exceptions.QueryCanceledError:
            raise self._timed_out() from None
        except asyncpg.exceptions.PostgresError as exc:
            code = "read_only_violation" if exc.sqlstate in _WRITE_DENIED else "invalid_query"
            raise HandlerError(f"{exc.sqlstate}: {exc}", code=code) from None
        except asyncpg.exceptions.DataError as exc:
            raise HandlerError(f"invalid parameter: {exc}", code="invalid_query") from None
        return {"columns": columns, "rows": rows, "row_count": len(rows), "truncated": truncated}

    def _timed_out(self) -> HandlerError:
        return HandlerError(
            f"the query ran longer than {self._timeout:g}s and was cancelled",
            code="query_timeout",
        )

    async def _read(
        self, conn: Any, sql: str, params: list[Any], max_rows: int, timeout_ms: int
    ) -> tuple[list[str], list[Any], bool]:
        async with conn.transaction(readonly=True):
            await conn.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
            stmt = await conn.prepare(sql)
            types = stmt.get_parameters()
            if len(types) != len(params):
                raise HandlerError(
                    f"the query has {len(types)} parameter(s), {len(params)} given",
                    code="invalid_query",
                )
            args = [
                coerce_param(value, t.name, i + 1)
                for i, (value, t) in enumerate(zip(params, types, strict=True))
            ]
            columns = [a.name for a in stmt.get_attributes()]
            cursor = await stmt.cursor(*args)
            rows, truncated = await self._fetch_bounded(cursor, max_rows)
        return columns, rows, truncated

    async def _fetch_bounded(self, cursor: Any, max_rows: int) -> tuple[list[Any], bool]:
        """Rows up to `max_rows` and `max_bytes` of JSON (`ReplyBudget`), fetched in pages so a
        huge result is never held in memory; `truncated` when either cap cut it short."""
        budget = ReplyBudget(self._max_bytes)
        while True:
            page = await cursor.fetch(min(FETCH_PAGE, max_rows + 1 - len(budget.rows)))
            for record in page:
                if len(budget.rows) == max_rows or not budget.add(row_to_json(record)):
                    return budget.rows, True
            if not page:
                return budget.rows, False

    # -- small read request types ------------------------------------------------------------
    async def _fetch(self, request_type: str, sql: str, *args: Any) -> list[Any]:
        started = time.perf_counter()
        try:
            with transient_errors(request_type):
                async with self._reader().acquire(timeout=self._timeout) as conn:
                    try:
                        return list(await conn.fetch(sql, *args, timeout=self._timeout))
                    except TimeoutError:
                        # the read itself was slow (a wide history on a busy database): say so,
                        # not "database unavailable"; a connection not had in time still is one
                        raise self._timed_out() from None
        finally:
            self._metrics.queries.labels(request_type).observe(time.perf_counter() - started)

    def _timestamp(self, payload: Mapping[str, Any], name: str) -> Any:
        try:
            return parse_timestamp(payload.get(name), name)
        except InvalidPayload as exc:
            raise HandlerError(str(exc), code="invalid_request") from None

    def _kpi_code(self, payload: Mapping[str, Any], *, required: bool) -> str | None:
        code = _payload_str(payload, "kpi_code", required=required)
        if code is not None and not KPI_CODE.match(code):
            raise HandlerError("kpi_code: not a valid KPI code", code="invalid_request")
        return code

    async def kpi_history(self, request: Request) -> dict[str, Any]:
        p = request.payload
        code = self._kpi_code(p, required=True)
        start, end = self._timestamp(p, "start"), self._timestamp(p, "end")
        limit = _payload_int(p, "limit", 1000, HISTORY_LIMIT)
        dims = p.get("dimensions")
        if dims is not None and not isinstance(dims, dict):
            raise HandlerError("dimensions: an object is required", code="invalid_request")
        sql = (
            f"SELECT {_RESULT_COLUMNS} FROM kpi_results r WHERE kpi_code = $1"
            " AND window_start >= $2 AND window_start < $3"
            " AND ($4::jsonb IS NULL OR dimensions @> $4::jsonb)"
            f" AND {_NOT_SUPERSEDED}"
            " ORDER BY window_start, window_end, dims_key LIMIT $5"
        )
        dims_json = None if dims is None else orjson.dumps(dims).decode()
        records = await self._fetch("kpi_history", sql, code, start, end, dims_json, limit)
        return self._results_reply(records)

    async def latest_kpi_values(self, request: Request) -> dict[str, Any]:
        code = self._kpi_code(request.payload, required=False)
        sql = (
            f"SELECT DISTINCT ON (kpi_code, dims_key) {_RESULT_COLUMNS} FROM kpi_results r"
            f" WHERE ($1::text IS NULL OR kpi_code = $1) AND {_OF_NEWEST_VERSION}"
            " ORDER BY kpi_code, dims_key, window_end DESC, window_start DESC"
        )
        records = await self._fetch("latest_kpi_values", sql, code)
        return self._results_reply(records)

    def _results_reply(self, records: Sequence[Any]) -> dict[str, Any]:
        """`{rows, truncated}`: the results within `max_bytes` of JSON (`ReplyBudget`)."""
        budget = ReplyBudget(self._max_bytes)
        truncated = not all(budget.add(_result_json(r)) for r in records)
        return {"rows": budget.rows, "truncated": truncated}

    async def get_entity(self, request: Request) -> dict[str, Any]:
        entity_type = _payload_str(request.payload, "entity_type")
        entity_id = _payload_str(request.payload, "entity_id")
        sql = f"SELECT {_ENTITY_COLUMNS} FROM entities WHERE entity_type = $1 AND entity_id = $2"
        records = await self._fetch("get_entity", sql, entity_type, entity_id)
        return {"entity": _result_json(records[0]) if records else None}

    async def list_entities(self, request: Request) -> dict[str, Any]:
        p = request.payload
        entity_type = _payload_str(p, "entity_type")
        after = _payload_str(p, "after", required=False)
        active = p.get("active")
        if active is not None and not isinstance(active, bool):
            raise HandlerError("active: true or false is required", code="invalid_request")
        limit = _payload_int(p, "limit", ENTITY_PAGE_DEFAULT, ENTITY_PAGE_LIMIT)
        records = await self._fetch(
            "list_entities", LIST_ENTITIES, entity_type, after or "", active, limit
        )
        # Within `max_bytes` of JSON (`ReplyBudget`) too, so the reply fits a message; a page
        # cut short there goes on after its last row like a full one. One entity is always
        # sent, however large (as `get_entity` would): the next page must move on.
        budget = ReplyBudget(self._max_bytes)
        more = len(records) == limit
        for record in records:
            row = _result_json(record)
            if not budget.add(row):
                if not budget.rows:
                    budget.rows.append(row)
                more = True
                break
        rows = budget.rows
        return {"rows": rows, "next_after": rows[-1]["entity_id"] if more else None}

    # -- commands ----------------------------------------------------------------------------
    async def purge_kpi_results(self, request: Request) -> dict[str, Any]:
        code = self._kpi_code(request.payload, required=True)
        with transient_errors("purge_kpi_results"):
            async with self._writer().acquire(timeout=self._timeout) as conn, conn.transaction():
                status = await conn.execute("DELETE FROM kpi_results WHERE kpi_code = $1", code)
                await conn.execute("DELETE FROM kpi_result_versions WHERE kpi_code = $1", code)
        return {"kpi_code": code, "deleted": int(status.rsplit(" ", 1)[-1])}

    async def record_kpi_version(self, request: Request) -> dict[str, Any]:
        p = request.payload
        code = self._kpi_code(p, required=True)
        version = p.get("definition_version")
        if isinstance(version, bool) or not isinstance(version, int) or not 0 < version < 2**31:
            raise HandlerError(
                "definition_version: a positive integer is required", code="invalid_request"
            )
        since = self._timestamp(p, "since")
        with transient_errors("record_kpi_version"):
            async with self._writer().acquire(timeout=self._timeout) as conn:
                await conn.execute(RECORD_VERSIONS, [code], [version], [since])
                stored = await conn.fetchval(
                    "SELECT since FROM kpi_result_versions"
                    " WHERE kpi_code = $1 AND definition_version = $2",
                    code,
                    version,
                )
        return {"kpi_code": code, "definition_version": version, "since": to_json_value(stored)}

    async def request_archival(self, request: Request) -> dict[str, Any]:
        raw = request.payload.get("older_than")
        try:
            older_than = None if raw is None else parse_duration(raw)
        except ValueError as exc:
            raise HandlerError(f"older_than: {exc}", code="invalid_request") from None
        return dict(await self._request_archival(older_than))
