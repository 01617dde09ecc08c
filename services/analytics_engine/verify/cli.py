"""`analytics-engine verify`: wire settings, definitions, PostgreSQL and the lake to the pure
comparison, print the result. Exit codes: 0 clean, 1 any mismatch, 2 configuration or
connection error (one clear line on stderr)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from analytics_engine.core.settings import ConfigurationError, load_settings
from analytics_engine.kpi.definitions import KPIDefinition
from analytics_engine.kpi.filters import FilterError
from analytics_engine.kpi.loader import DefinitionLoadError
from analytics_engine.verify import db
from analytics_engine.verify.compare import (
    Mismatch,
    ResultRow,
    compare_kpi,
    compare_lake,
    duplicate_events,
)
from analytics_engine.verify.definitions import Catalog, DefinitionsUnavailable, load_catalog
from analytics_engine.verify.engine import (
    EngineBackfills,
    EngineUnavailable,
    PendingBackfill,
    VersionStart,
    engine_backfills,
)
from analytics_engine.verify.lake import Lake
from analytics_engine.verify.report import Report, render_json, render_text
from analytics_engine.verify.sql import lateness_of

ARCHIVE_GRACE = timedelta(seconds=60)
IDLE_CLOSE = timedelta(seconds=30)
"""Stored results younger than this may still sit in the archival buffer: not checked."""


class VerifySettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # The connection URLs hold passwords: out of the repr.
    database_url: str = Field(
        validation_alias="DATABASE_URL",
        pattern=r"^postgres(ql)?://",
        repr=False,
        description="PostgreSQL holding `entity_events` and `kpi_results` (a read-only role "
        "is enough).",
    )
    redis_url: str | None = Field(
        default="redis://localhost:6379",
        validation_alias="REDIS_URL",
        repr=False,
        description="Where to ask the metadata service for the KPI definitions "
        "(`metadata.lookup`); `KPI_DEFINITIONS_DIR` is read when none answers.",
    )
    kpi_definitions_dir: str | None = Field(
        default=None,
        validation_alias="KPI_DEFINITIONS_DIR",
        description="YAML KPI definitions, used when no metadata service answers.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias="S3_ENDPOINT_URL",
        description="The lake's S3 endpoint; unset, the Parquet archive is not checked.",
    )
    s3_bucket: str = Field(
        default="analytics-lakehouse",
        validation_alias="S3_BUCKET",
        description="The lake's bucket.",
    )
    aws_access_key_id: str | None = Field(
        default=None, validation_alias="AWS_ACCESS_KEY_ID", description="S3 access key."
    )
    aws_secret_access_key: str | None = Field(
        default=None,
        validation_alias="AWS_SECRET_ACCESS_KEY",
        repr=False,
        description="S3 secret key.",
    )
    aws_region: str = Field(
        default="us-east-1", validation_alias="AWS_REGION", description="S3 region."
    )
    calculation_url: str | None = Field(
        default=None,
        validation_alias="CALCULATION_URL",
        pattern=r"^https?://",
        description="The calculation engine's HTTP API, asked which windows await a backfill "
        "and where each KPI version's results begin; unset, those windows count as missing.",
    )


class VerifyError(Exception):
    """Configuration or connection problem: exit code 2 with this message."""


@dataclass(frozen=True, slots=True)
class Options:
    start: datetime | None
    end: datetime | None
    kpis: list[str] | None
    skip_lake: bool
    json: bool
    # Results forwarded to the archive less than this long ago may still sit in the archival
    # service's batch; they are not expected in the lake yet.
    archive_grace: timedelta = ARCHIVE_GRACE
    # The engine also closes windows by the clock when no newer event arrives (its idle
    # close). A window whose close time is this far in the past counts as closed even when
    # no event published after it exists.
    idle_close: timedelta = IDLE_CLOSE


def parse_time(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise VerifyError(f"--{name}: not an ISO 8601 time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def options_from(args: argparse.Namespace) -> Options:
    start = parse_time(getattr(args, "start", None), "start")
    end = parse_time(getattr(args, "end", None), "end")
    if start is not None and end is not None and end <= start:
        raise VerifyError("--end must be after --start")
    return Options(
        start=start,
        end=end,
        kpis=list(args.kpi) if getattr(args, "kpi", None) else None,
        skip_lake=bool(getattr(args, "skip_lake", False)),
        json=bool(getattr(args, "json", False)),
        archive_grace=timedelta(seconds=float(getattr(args, "archive_grace", 60.0))),
        idle_close=timedelta(seconds=float(getattr(args, "idle_close", 30.0))),
    )


def select(catalog: Catalog, codes: list[str] | None) -> list[KPIDefinition]:
    streaming = {d.code: d for d in catalog.definitions if d.is_streaming and d.enabled}
    if codes is None:
        return [streaming[c] for c in sorted(streaming)]
    known = {d.code for d in catalog.definitions}
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise VerifyError(f"unknown KPI code(s): {', '.join(unknown)}")
    not_streaming = [c for c in codes if c not in streaming]
    if not_streaming:
        raise VerifyError(
            f"not enabled streaming KPIs (cannot be recomputed): {', '.join(not_streaming)}"
        )
    return [streaming[c] for c in codes]


async def verify(settings: VerifySettings, options: Options) -> Report:
    try:
        catalog = await load_catalog(settings.redis_url, settings.kpi_definitions_dir)
    except (DefinitionsUnavailable, DefinitionLoadError) as exc:
        raise VerifyError(str(exc).replace("\n", "; ")) from None
    definitions = select(catalog, options.kpis)
    report = Report(start=options.start, end=options.end, definitions_source=catalog.source)
    engine = await _engine_backfills(settings, report)
    backfills = engine.pending
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise VerifyError(f"cannot connect to PostgreSQL: {exc}") from None
    try:
        stored_in_range: dict[str, tuple[datetime, datetime]] = {}
        data = await db.bounds(conn)
        now = datetime.now(UTC)
        watermark = max(
            (t for t in (data.newest_published, now - options.idle_close) if t is not None),
            default=None,
        )
        for definition in definitions:
            span = _range(definition, data, options)
            deleted = _deleted_note(definition, data, options)
            if deleted is not None:
                report.notes.append(deleted)
            if span is None:
                if deleted is None:
                    report.notes.append(f"{definition.code}: no events and no results")
                continue
            start, end = span
            stored_in_range[definition.code] = span
            report.start = start if report.start is None else min(report.start, start)
            report.end = end if report.end is None else max(report.end, end)
            types = catalog.attribute_types.get(definition.entity_type)
            try:
                expected = await db.recompute(conn, definition, start=start, end=end, types=types)
            except FilterError as exc:
                report.mismatches.append(
                    Mismatch(
                        "unverifiable", definition.code, detail=f"filter has no SQL form: {exc}"
                    )
                )
                continue
            except asyncpg.DataError as exc:
                # the data makes PostgreSQL fail where the engine does not (a product out of
                # float range in the filter, say): this KPI cannot be recomputed, the others can
                report.mismatches.append(
                    Mismatch(
                        "unverifiable",
                        definition.code,
                        detail=f"PostgreSQL cannot recompute it: {type(exc).__name__}: {exc}",
                    )
                )
                continue
            stored = await db.stored_results(conn, [definition.code], start=start, end=end)
            since = _version_start(definition.code, engine.coverage, catalog)
            result = compare_kpi(
                definition.code,
                expected,
                stored,
                lateness=lateness_of(definition),
                watermark=watermark,
                definition_version=catalog.versions.get(definition.code),
                pending=_pending_windows(definition.code, backfills, catalog),
                version_since=since.since if since is not None else None,
            )
            report.mismatches.extend(result.mismatches)
            if result.summary is not None:
                report.kpis.append(result.summary)
                if result.summary.pending_backfill:
                    backfill = backfills[definition.code]
                    report.notes.append(
                        f"{definition.code}: {result.summary.pending_backfill} window(s) starting "
                        f"before {backfill.cut.isoformat()} await the calculation engine's "
                        f"backfill, due after {backfill.due.isoformat()}; verify again then"
                    )
                if result.summary.before_version_skipped and since is not None:
                    report.notes.append(
                        f"{definition.code}: {result.summary.before_version_skipped} window(s) "
                        f"starting before {since.since.isoformat()} have no result of definition "
                        f"version {since.definition_version}, which the calculation engine "
                        "computes from there on: not expected"
                    )
        if options.kpis is None:
            # Every stored result is archived, whatever its KPI is now: a query KPI (which
            # cannot be recomputed: each result read the database as it was then), a disabled
            # one, one no longer defined. The lake check covers their results too.
            for code in sorted(data.results):
                if code not in stored_in_range:
                    span = data.results[code]
                    stored_in_range[code] = (options.start or span[0], options.end or span[1])
        if options.skip_lake:
            report.notes.append("lake not checked (--skip-lake)")
        elif settings.s3_endpoint_url is None:
            report.notes.append("lake not checked (S3_ENDPOINT_URL is not set)")
        elif stored_in_range:
            await _check_lake(conn, settings, stored_in_range, report, options.archive_grace)
    except (OSError, asyncpg.InterfaceError) as exc:
        raise VerifyError(f"lost the PostgreSQL connection: {exc}") from None
    finally:
        await conn.close()
    return report


async def _engine_backfills(settings: VerifySettings, report: Report) -> EngineBackfills:
    nothing = EngineBackfills(pending={}, coverage={})
    if settings.calculation_url is None:
        report.notes.append(
            "calculation engine not asked (CALCULATION_URL is not set): windows awaiting a "
            "backfill, and windows before a new or changed KPI took effect, count as missing"
        )
        return nothing
    try:
        return await engine_backfills(settings.calculation_url)
    except EngineUnavailable as exc:
        report.notes.append(
            f"calculation engine not reachable ({exc}): windows awaiting a backfill, and "
            "windows before a new or changed KPI took effect, count as missing"
        )
        return nothing


def _pending_windows(
    code: str, backfills: dict[str, PendingBackfill], catalog: Catalog
) -> Callable[[datetime], bool] | None:
    """Whether a window of `code` (by its start) awaits the engine's backfill of the definition
    verify checks; None when none is pending."""
    backfill = backfills.get(code)
    version = catalog.versions.get(code)
    if backfill is None or (version is not None and backfill.definition_version != version):
        return None
    return backfill.covers


def _version_start(
    code: str, coverage: dict[str, VersionStart], catalog: Catalog
) -> VersionStart | None:
    """Where the engine's results of the definition verify checks begin; None when the engine
    did not say, or said it of another version (it has not taken the current one yet)."""
    start = coverage.get(code)
    version = catalog.versions.get(code)
    if start is None or (version is not None and start.definition_version != version):
        return None
    return start


def _range(
    definition: KPIDefinition, data: db.Bounds, options: Options
) -> tuple[datetime, datetime] | None:
    """The windows to check: the requested range, completed by the default one, but never
    reaching into a day whose events were archived and deleted from PostgreSQL (their windows
    cannot be recomputed from it: their stored results would all look wrong); None when
    nothing is left."""
    default = db.default_range(definition, data)
    if options.start is not None and options.end is not None:
        start, end = options.start, options.end
    elif default is None:
        return None
    else:
        start, end = options.start or default[0], options.end or default[1]
    floor = data.deleted_until.get(definition.entity_type)
    if floor is not None and start < floor:
        start = floor
    return (start, end) if start < end else None


def _deleted_note(definition: KPIDefinition, data: db.Bounds, options: Options) -> str | None:
    """Why a requested range was cut at its start, if it was."""
    floor = data.deleted_until.get(definition.entity_type)
    if floor is None or options.start is None or options.start >= floor:
        return None
    return (
        f"{definition.code}: windows starting before {floor.isoformat()} not checked: the "
        f"{definition.entity_type} events before then were archived and deleted from PostgreSQL"
    )


async def _check_lake(
    conn: Any,
    settings: VerifySettings,
    spans: dict[str, tuple[datetime, datetime]],
    report: Report,
    grace: timedelta,
) -> None:
    assert settings.s3_endpoint_url is not None
    lake = Lake(
        endpoint_url=settings.s3_endpoint_url,
        bucket=settings.s3_bucket,
        access_key=settings.aws_access_key_id,
        secret_key=settings.aws_secret_access_key,
        region=settings.aws_region,
    )
    try:
        await asyncio.to_thread(lake.check)
    except (BotoCoreError, ClientError) as exc:
        raise VerifyError(f"cannot reach the lake bucket {settings.s3_bucket}: {exc}") from None
    cutoff = datetime.now(UTC) - grace
    stored: list[ResultRow] = []
    archived: list[ResultRow] = []
    try:
        for code, (start, end) in spans.items():
            stored += await db.stored_results(
                conn, [code], start=start, end=end, archived_before=cutoff
            )
            archived += await asyncio.to_thread(lake.kpi_results, [code], start=start, end=end)
        first = min(s for s, _ in spans.values()).date()
        last = max(e for _, e in spans.values()).date()
        event_ids = await asyncio.to_thread(lambda: list(lake.event_ids(start=first, end=last)))
    except (BotoCoreError, ClientError) as exc:
        raise VerifyError(f"cannot read the lake: {exc}") from None
    report.mismatches.extend(compare_lake(stored, archived))
    report.mismatches.extend(duplicate_events(event_ids))
    report.mismatches.extend(
        Mismatch("unverifiable", "-", detail=f"lake object {key} cannot be read: {why}")
        for key, why in lake.unreadable
    )
    report.lake = {
        "results_checked": len(stored),
        "results_archived": len(archived),
        "events_archived": len(event_ids),
    }


def run_verify(args: argparse.Namespace) -> int:
    """Entry point of `analytics-engine verify`; returns the exit code."""
    # The report is the output; library chatter (reconnect warnings) would only blur it.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(VerifySettings)
        options = options_from(args)
        report = asyncio.run(verify(settings, options))
    except ConfigurationError:
        return 2  # load_settings printed the one line
    except VerifyError as exc:
        print(f"verify: {exc}", file=sys.stderr)
        return 2
    print(render_json(report) if options.json else render_text(report))
    return 0 if report.ok else 1
