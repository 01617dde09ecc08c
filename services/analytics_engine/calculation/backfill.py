"""Backfill of a new or changed streaming KPI over stored history (database stream replay).

Cut-over rule (one number per job, the *cut* = just after the live engine's watermark when the
definition took effect, `cut_after`):

* windows starting before the cut come from the backfill (the live engine missed the events
  it processed before the change); the live engine's results for them are suppressed;
* windows starting at or after the cut come from the live engine alone: all their events
  occurred at or after the cut, hence were published after the watermark, so the new
  version's live state sees every one of them (this assumes `occurred_at <= published_at`,
  which the simulator guarantees).

The backfill covers windows starting in `[since, cut)`, `since` being the earlier of
`cut - horizon` aligned down to the window grid (closed windows recomputed under the new
definition: the horizon) and the first window still open at the cut (`start + size +
allowed_lateness >= cut`: closing after the watermark). Every window starting before the cut
that is still open at it is suppressed live, so the backfill must reach back to the first of
them however long the windows are; otherwise a sliding window longer than horizon + slide,
or a tumbling one whose size + allowed lateness exceeds the horizon, would never be
published. `since` is also where the
definition version's results begin: `coverage` records it for `verify`, the backfill's
results carry it (`version_since`) for the database's history, and a backfill with no result
at all tells the database directly (`database.command record_kpi_version`). The backfill runs
once every such window has closed (`until` = the last one's close) and the database had
`delay` to store its events: `stream.subscribe {subscription_id, entity_type,
since, until, channel}` makes the database replay stored events into `channel`
(`{event: envelope}` items, then `{subscription_id, done: true, count}`), kept alive with
`stream.heartbeat`, ended with `stream.unsubscribe` (an end marker with a `reason`, e.g.
`timeout` when the database missed the heartbeats, fails the attempt: it is retried with a new
subscription). Replayed events are fed in publication order
(the engine's watermark needs it; the database replays in event-time order: see
`backfill_compute`) to a separate `KPIEngine` holding only this KPI, so the live state is never
touched.

Before it replays, a due backfill checks that the database has stored every entity event
published up to `until` (`unstored`): the replay reads the database, and a database that lags
(a backlog, a restart, a slow PostgreSQL) would otherwise yield final results that miss events.
On each aggregated entity stream, the database service's consumer group must have delivered
every entry up to `until` (its last-delivered id at or past it, or at the stream's last id) and
hold none of them pending (a pending entry is not yet written, or its write failed). Until then
the backfill waits (`pending()` says why). Stream ids are the Redis server's milliseconds, so
this assumes the engine's and Redis's clocks agree to within `delay`. Deactivations are not
checked: they never aggregate, and the replay drops them.

Jobs are part of the checkpoint, so a crash re-runs an unfinished backfill (its results are
re-published with the same event ids: duplicates, never gaps).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from analytics_engine.calculation.backfill_compute import BackfillComputation
from analytics_engine.calculation.events import EntityEvent, InvalidEntityEvent, entity_event
from analytics_engine.core import channels
from analytics_engine.core.bus import FIELD, REDIS_ERRORS
from analytics_engine.core.channels import StreamId, parse_stream_id
from analytics_engine.core.envelopes import Event, utcnow
from analytics_engine.core.errors import RequestError
from analytics_engine.kpi import KPIResult, VersionedKPIDefinition, referenced_names
from analytics_engine.kpi.definitions import Window
from analytics_engine.kpi.windows import from_micros, to_micros

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from analytics_engine.core.bus import EventPublisher

log = logging.getLogger(__name__)

REPLAY_CHANNEL_PREFIX: Final = f"{channels.REPLAY_PREFIX}calculation_engine."
MAX_ATTEMPTS: Final = 5
DATABASE_GROUP: Final = "database_service"
"""The database service's consumer group (its service name) on the entity streams."""
STORED_CHANNELS: Final = (channels.ENTITY_CREATED, channels.ENTITY_UPDATED)
"""The entity streams whose events a replay returns (deactivations never aggregate)."""
READY_RETRY_S: Final = 2.0
LEFTOVER_RECHECK_S: Final = 120.0
"""A swept replay stream is deleted again this long after (past the database's heartbeat
timeout, `DATABASE_SUBSCRIPTION_TIMEOUT`, 30 s by default, should the unsubscribe be lost)."""
REPLAY_GROUP: Final = "calculation_engine"
"""The consumer group (and consumer) the engine reads its replay streams through."""


def owner_tag(owner: str) -> str:
    """A fixed-length tag of an engine's consumer name, which begins its subscription ids
    (`{tag}-{uuid}`): no name is a prefix of another's tag, and the id stays within the 100
    characters of `[A-Za-z0-9_.-]` that `stream.subscribe` allows, whatever the name."""
    return hashlib.blake2b(owner.encode(), digest_size=6).hexdigest()


class BackfillFailed(Exception):
    pass


class BackfillTooLarge(BackfillFailed):
    """More replayed events held at once than `CALCULATION_BACKFILL_MAX_EVENTS` (waiting to be
    fed in publication order): another attempt would replay the same history again to the same
    end."""


@dataclass
class BackfillJob:
    definition: VersionedKPIDefinition
    cut: datetime
    since: datetime
    until: datetime
    attempts: int = 0
    done: bool = False
    failed: bool = False
    """Abandoned (`done` too): it published nothing, and its windows get no result."""
    not_before: float = field(default=0.0, compare=False)
    waiting: str | None = field(default=None, compare=False)
    """Why a due job waits for the database (`unstored`), None when it does not."""

    @property
    def code(self) -> str:
        return self.definition.code

    def to_dict(self) -> dict[str, Any]:
        return {
            "definition": self.definition.model_dump(mode="json"),
            "cut": self.cut.isoformat(),
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "attempts": self.attempts,
            "done": self.done,
            "failed": self.failed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackfillJob:
        return cls(
            definition=VersionedKPIDefinition.model_validate(data["definition"]),
            cut=datetime.fromisoformat(data["cut"]),
            since=datetime.fromisoformat(data["since"]),
            until=datetime.fromisoformat(data["until"]),
            attempts=int(data.get("attempts", 0)),
            done=bool(data.get("done", False)),
            failed=bool(data.get("failed", False)),
        )


def backfill_since(window: Window, cut_us: int, horizon_us: int) -> int:
    """The first window start a backfill at `cut_us` covers (pure, epoch microseconds).

    The earlier of `cut - horizon` aligned down to the grid and the first window still open
    when the definition took effect, at the watermark (`cut - 1`, see `cut_after`): the engine
    closes `W` once its watermark reaches `W.start + size + allowed_lateness`, so the open
    windows are those starting after `watermark - size - allowed_lateness`, and the first of
    them is the next grid point after that instant."""
    size = to_micros(window.size)
    step = to_micros(window.slide) if window.slide is not None else size
    by_horizon = cut_us - horizon_us
    by_horizon -= by_horizon % step
    still_open_after = cut_us - 1 - size - to_micros(window.allowed_lateness)
    first_open = still_open_after - still_open_after % step + step
    return min(by_horizon, first_open)


@dataclass(frozen=True, slots=True)
class Coverage:
    """A definition version's results begin with the windows starting at `since`."""

    definition_version: int
    since: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"definition_version": self.definition_version, "since": self.since.isoformat()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Coverage:
        return cls(int(data["definition_version"]), datetime.fromisoformat(data["since"]))


def cut_after(watermark: datetime) -> datetime:
    """The cut of a definition that takes effect at the live engine's `watermark`: the instant
    just after it (engine times are whole microseconds), so a window starting at the watermark
    itself comes from the backfill. The live engine may already have taken in events that
    occurred at the watermark (published then too: producers stamping whole seconds or
    milliseconds), which the new version's empty state never sees."""
    return watermark + timedelta(microseconds=1)


def plan(
    definition: VersionedKPIDefinition,
    cut: datetime,
    horizon: timedelta,
    *,
    reach: datetime | None = None,
) -> BackfillJob:
    """The job for a definition that took effect at `cut` (pure). `reach`: it starts no later
    than the window (on its grid) holding that instant: where the job it supersedes began,
    when that one never ran (see `BackfillManager.schedule`)."""
    window = definition.window
    assert window is not None
    size = to_micros(window.size)
    step = to_micros(window.slide) if window.slide is not None else size
    cut_us = to_micros(cut)
    since_us = backfill_since(window, cut_us, to_micros(horizon))
    if reach is not None:
        reach_us = to_micros(reach)
        since_us = min(since_us, reach_us - reach_us % step)
    last_start = (cut_us - 1) - (cut_us - 1) % step
    until_us = last_start + size + to_micros(window.allowed_lateness)
    return BackfillJob(definition, cut, from_micros(since_us), from_micros(until_us))


def needed_attributes(definition: VersionedKPIDefinition) -> frozenset[str]:
    names = set(definition.group_by)
    if definition.field is not None:
        names.add(definition.field)
    if definition.filter is not None:
        names |= referenced_names(definition.filter)
    return frozenset(names)


def computation(job: BackfillJob, *, skew: timedelta = timedelta(0)) -> BackfillComputation:
    """The job's computation: results of the windows starting in [since, cut)."""
    return BackfillComputation(
        job.definition, since=job.since, cut=job.cut, until=job.until, skew=skew
    )


def compute(job: BackfillJob, events: Iterable[EntityEvent]) -> list[KPIResult]:
    """The job's results from replayed events in any order (pure; sorts them as the database
    replays them)."""
    work = computation(job)
    for event in sorted(events, key=lambda e: (e.occurred_at, e.published_at, e.event_id)):
        work.add(event)
    return work.finish()


@dataclass(frozen=True, slots=True)
class GroupProgress:
    """The database group's progress on one entity stream, read in one snapshot."""

    last_generated: StreamId | None
    """The stream's last entry id; None: no such stream (nothing was ever published)."""
    last_delivered: StreamId | None
    """The group's last-delivered id; None: no such group (the database never read it)."""
    oldest_pending: StreamId | None
    """The smallest id delivered to it but not acknowledged (not yet stored); None: none."""


def stored_bound(until: datetime) -> StreamId:
    """The first stream id a backfill up to `until` does not need stored: entries of the
    milliseconds up to and including `until`'s must be."""
    return (to_micros(until) // 1000 + 1, 0)


def unstored(progress: Mapping[str, GroupProgress], bound: StreamId) -> str | None:
    """Why the database may not yet have stored every entry before `bound`, or None when it
    has (pure): on every stream, every entry before `bound` was delivered to its group (the
    group's last-delivered id reached `bound` or the stream's last id; groups deliver in id
    order) and none of them is still pending."""
    for channel, p in sorted(progress.items()):
        if p.last_generated is None or p.last_generated == (0, 0):
            continue  # no stream, or an empty one: no event was ever published there
        if p.last_delivered is None:
            return f"{channel}: the database has no consumer group yet"
        if p.last_delivered < bound and p.last_delivered < p.last_generated:
            return f"{channel}: the database has not yet read up to the backfill's end"
        if p.oldest_pending is not None and p.oldest_pending < bound:
            return f"{channel}: the database has not yet stored events before the backfill's end"
    return None


def _id(raw: Any) -> StreamId | None:
    return None if raw is None else parse_stream_id(raw)


async def database_progress(
    redis: Redis, channel_names: tuple[str, ...] = STORED_CHANNELS, group: str = DATABASE_GROUP
) -> dict[str, GroupProgress]:
    """Read `GroupProgress` per channel (XINFO STREAM, XINFO GROUPS, XPENDING summary, in one
    MULTI so they agree). Redis errors other than a missing stream or group propagate."""
    pipe = redis.pipeline(transaction=True)
    for channel in channel_names:
        key = channels.stream_key(channel)
        pipe.xinfo_stream(key)
        pipe.xinfo_groups(key)
        pipe.xpending(key, group)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    progress: dict[str, GroupProgress] = {}
    for i, channel in enumerate(channel_names):
        stream, groups, pending = replies[3 * i : 3 * i + 3]
        if isinstance(stream, Exception):
            if "no such key" not in str(stream).lower():
                raise stream
            progress[channel] = GroupProgress(None, None, None)
            continue
        if isinstance(groups, Exception):
            raise groups
        delivered = next(
            (g["last-delivered-id"] for g in groups if g["name"] in (group, group.encode())),
            None,
        )
        oldest = None
        if isinstance(pending, Exception):
            if "nogroup" not in str(pending).lower():
                raise pending
        elif pending["pending"]:
            oldest = pending["min"]
        progress[channel] = GroupProgress(
            _id(stream["last-generated-id"]), _id(delivered), _id(oldest)
        )
    return progress


class BackfillManager:
    """Schedules, runs and persists backfill jobs; tells the processor what to suppress."""

    def __init__(
        self,
        redis: Redis,
        publisher: EventPublisher,
        *,
        horizon: timedelta,
        delay: timedelta,
        max_events: int,
        idle_timeout_s: float = 30.0,
        heartbeat_s: float = 5.0,
        on_results: Callable[[list[KPIResult]], Awaitable[None]],
        watermark: Callable[[], datetime | None],
        on_outcome: Callable[[str], None] = lambda _: None,
        record_version: Callable[[str, int, datetime], Awaitable[None]] | None = None,
        ready_retry_s: float = READY_RETRY_S,
        owner: str = "calculation-engine-0",
    ) -> None:
        self._redis = redis
        self._owner_tag = owner_tag(owner)
        """Of the engine's consumer name (one per KPI set): its subscription ids begin with it,
        so `sweep` deletes its own leftovers only, never a running engine's of another set."""
        self._publisher = publisher
        self.horizon = horizon
        self.delay = delay
        self.max_events = max_events
        self.idle_timeout_s = idle_timeout_s
        self.heartbeat_s = heartbeat_s
        self._on_results = on_results
        self._watermark = watermark
        self._on_outcome = on_outcome
        self._record_version = record_version
        """Tells the database where a version begins (`database.command record_kpi_version`),
        for a backfill with no result to say it (`version_since`); raises `RequestError`."""
        self.ready_retry_s = ready_retry_s
        self.jobs: dict[str, BackfillJob] = {}
        self.coverage: dict[str, Coverage] = {}
        """Where each KPI's current version begins (its backfill's `since`), kept after the
        job is done and dropped: `verify` expects no result of that version before it."""
        self._wake = asyncio.Event()
        self.leftover_recheck_s = LEFTOVER_RECHECK_S
        self._leftovers: dict[bytes, float] = {}
        """Replay streams `sweep` deleted, to delete again (monotonic time when)."""

    # -- scheduling ------------------------------------------------------------------------
    def schedule(self, definition: VersionedKPIDefinition, watermark: datetime) -> BackfillJob:
        """The backfill of a definition that took effect when the live engine's watermark was
        `watermark` (see `cut_after`); it replaces the code's job, if any.

        A replaced job that has not completed (changed again before its backfill ran, or while
        the engine was down) published nothing, and the live results of the windows it was to
        publish were suppressed: its windows still open at its cut have no result of any
        version. The new job therefore reaches back to where the replaced one began, however
        far that is behind its own horizon."""
        superseded = self.jobs.get(definition.code)
        reach = superseded.since if superseded is not None and not superseded.done else None
        job = plan(definition, cut_after(watermark), self.horizon, reach=reach)
        self.jobs[definition.code] = job
        self.coverage[definition.code] = Coverage(definition.version, job.since)
        self._wake.set()
        log.info(
            "backfill scheduled",
            extra={"kpi": job.code, "since": job.since.isoformat(), "cut": job.cut.isoformat()},
        )
        return job

    def cancel(self, code: str) -> None:
        """Forget the KPI's job and coverage (removed, or changed with no backfill to follow)."""
        self.jobs.pop(code, None)
        self.coverage.pop(code, None)

    def suppressed(self, result: KPIResult) -> bool:
        job = self.jobs.get(result.kpi_code)
        return (
            job is not None
            and job.definition.version == result.definition_version
            and result.window_start < job.cut
        )

    def checkpoint_section(self) -> dict[str, Any]:
        return {
            "backfills": [job.to_dict() for job in self.jobs.values()],
            "backfill_coverage": {code: c.to_dict() for code, c in self.coverage.items()},
        }

    def restore(self, data: Mapping[str, Any] | None) -> None:
        for code, item in (data or {}).get("backfill_coverage", {}).items():
            try:
                self.coverage[code] = Coverage.from_dict(item)
            except (KeyError, TypeError, ValueError):
                log.warning("dropping an unreadable backfill coverage from the checkpoint")
        for item in (data or {}).get("backfills", []):
            try:
                job = BackfillJob.from_dict(item)
            except (KeyError, ValueError, ValidationError):
                log.warning("dropping an unreadable backfill job from the checkpoint")
                continue
            self.jobs[job.code] = job
            # a checkpoint written before coverage was recorded: its jobs still say
            self.coverage.setdefault(job.code, Coverage(job.definition.version, job.since))

    def status(self, code: str) -> str | None:
        job = self.jobs.get(code)
        if job is None:
            return None
        if job.failed:
            return "backfill_failed"
        return "backfilled" if job.done else "backfill_pending"

    def pending(self, code: str) -> dict[str, Any] | None:
        """The windows a pending backfill will publish (starting in `[since, cut)`) and when
        it runs at the earliest (`due`), for a KPI with one; else None. `verify` reports
        these windows as pending instead of missing."""
        job = self.jobs.get(code)
        if job is None or job.done:
            return None
        return {
            "definition_version": job.definition.version,
            "since": job.since.isoformat(),
            "cut": job.cut.isoformat(),
            "due": (job.until + self.delay).isoformat(),
            "waiting_for_database": job.waiting,
        }

    def version_since(self, result: KPIResult) -> datetime | None:
        """Where `result`'s definition version begins, if a backfill reached back for it."""
        coverage = self.coverage.get(result.kpi_code)
        if coverage is None or coverage.definition_version != result.definition_version:
            return None
        return coverage.since

    def coverage_of(self, code: str) -> dict[str, Any] | None:
        """Where the KPI's current definition version begins (`{definition_version, since}`):
        the engine publishes that version's windows starting at or after `since`, none
        before. None when no backfill was ever scheduled for it (a KPI running since the
        engine's first start, or backfills disabled)."""
        coverage = self.coverage.get(code)
        return None if coverage is None else coverage.to_dict()

    # -- running ---------------------------------------------------------------------------
    async def run(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):  # else before the first replay
            await self.sweep()
        while True:
            self._wake.clear()
            with contextlib.suppress(*REDIS_ERRORS):
                await self._delete_leftovers()
            await self._run_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    async def _run_due(self) -> None:
        now = utcnow()
        for code, job in list(self.jobs.items()):
            # the jobs may have changed while an earlier one waited or replayed: a definition
            # changed (its job replaced) or removed; act on the code's current job only
            if self.jobs.get(code) is not job:
                continue
            if job.done:
                # live results for windows before the cut can no longer appear: drop the job
                watermark = self._watermark()
                if watermark is not None and watermark >= job.until:
                    del self.jobs[code]
                continue
            if now < job.until + self.delay or time.monotonic() < job.not_before:
                continue
            if not await self._stored(job):
                job.not_before = time.monotonic() + self.ready_retry_s
                continue
            if self.jobs.get(code) is job:
                await self._attempt(job)

    async def _stored(self, job: BackfillJob) -> bool:
        """Whether the database has stored everything the job replays (`unstored`); logs once
        when it starts waiting and once when it is done waiting."""
        try:
            reason = unstored(await database_progress(self._redis), stored_bound(job.until))
        except (*REDIS_ERRORS, RedisError) as exc:  # down, or refused (NOPERM): wait, log once
            reason = f"cannot read the database's progress: {str(exc)[:200]}"
        if reason is not None:
            if job.waiting is None:
                log.info("backfill waits for the database", extra={"kpi": job.code, "why": reason})
            job.waiting = reason
            return False
        if job.waiting is not None:
            log.info(
                "backfill resumes: the database has stored its events", extra={"kpi": job.code}
            )
            job.waiting = None
        return True

    async def _attempt(self, job: BackfillJob) -> None:
        job.attempts += 1
        work = computation(job, skew=self.delay)
        try:
            await self.replay(job, work)
            results = work.finish()
            if not results:
                await self._no_results(job)
        except (BackfillFailed, *REDIS_ERRORS) as exc:
            if job.attempts >= MAX_ATTEMPTS or isinstance(exc, BackfillTooLarge):
                log.error("backfill abandoned", extra={"kpi": job.code, "error": str(exc)[:300]})
                self._on_outcome("failed")
                # kept as a completed job until the live engine's watermark passes its end, as
                # one that succeeded: the live engine (lagging, reading a backlog) may still
                # hold its windows open at the cut, with only the events after it, and
                # publish them unless they stay suppressed
                job.done = job.failed = True
            else:
                log.warning(
                    "backfill failed, will retry", extra={"kpi": job.code, "error": str(exc)[:300]}
                )
                job.not_before = time.monotonic() + min(60.0, 5.0 * 2**job.attempts)
            return
        if self.jobs.get(job.code) is not job:
            return  # superseded while replaying
        await self._on_results(results)
        job.done = True
        self._on_outcome("completed")
        log.info(
            "backfill completed",
            extra={"kpi": job.code, "events": work.events, "results": len(results)},
        )
        if work.out_of_order:
            log.warning(
                "backfill fed events out of publication order (occurred after they were "
                "published, by more than CALCULATION_BACKFILL_DELAY): its results may count "
                "them late where the live engine did not",
                extra={"kpi": job.code, "events": work.out_of_order},
            )

    async def _no_results(self, job: BackfillJob) -> None:
        """A backfill that recomputed no window still ends the older versions' results from
        its `since` on (a narrower filter may match nothing there): with no result to carry
        `version_since`, the database is told directly, before the job counts as done (a
        failure retries the attempt, as a failed replay does)."""
        if self._record_version is None:
            return
        try:
            await self._record_version(job.code, job.definition.version, job.since)
        except RequestError as exc:
            raise BackfillFailed(
                f"could not record where version {job.definition.version} begins: {exc}"
            ) from exc

    async def sweep(self) -> int:
        """End and delete the replays an earlier life of the engine left (killed in the middle
        of a backfill, it neither unsubscribed nor deleted its stream, which the database may
        not delete): each would hold up to `DATABASE_REPLAY_MAX_LAG` entries for good. One
        active engine per KPI set, so no replay of ours is running while this runs. Returns
        how many streams went."""
        prefix = channels.stream_key(f"{REPLAY_CHANNEL_PREFIX}{self._owner_tag}-")
        keys: list[bytes] = [
            key async for key in self._redis.scan_iter(match=f"{prefix}*", count=1000)
        ]
        if not keys:
            return 0
        sid_at = len(channels.stream_key(REPLAY_CHANNEL_PREFIX))  # the channel ends with the id
        stop = [
            self._publisher.make_event(
                channels.STREAM_UNSUBSCRIBE, {"subscription_id": key.decode()[sid_at:]}
            )
            for key in keys
        ]
        await self._publisher.publish_events(stop)
        await self._redis.delete(*keys)
        # the database may publish a page (or the end marker) before it reads the unsubscribe:
        # delete them again once it surely has stopped
        again = time.monotonic() + self.leftover_recheck_s
        self._leftovers.update(dict.fromkeys(keys, again))
        log.info("deleted replay streams of an earlier run", extra={"streams": len(keys)})
        return len(keys)

    async def _delete_leftovers(self) -> None:
        now = time.monotonic()
        due = [key for key, at in self._leftovers.items() if at <= now]
        if due:
            await self._redis.delete(*due)
            for key in due:
                del self._leftovers[key]

    async def replay(self, job: BackfillJob, work: BackfillComputation) -> None:
        """Ask the database to replay the job's history; feed the events it needs to `work`
        as they come."""
        await self.sweep()
        subscription_id = f"{self._owner_tag}-{uuid.uuid4()}"
        channel = f"{REPLAY_CHANNEL_PREFIX}{subscription_id}"
        key = channels.stream_key(channel)
        needed = needed_attributes(job.definition)
        entity_type = job.definition.entity_type
        # Read through a consumer group (NOACK: nothing pending): the database pauses a replay
        # while the stream's readers lag by more than its bound, and a group's lag is what it
        # has not read yet. Read without one, the lag was the stream's length, which only
        # grows: a replay longer than the bound stalled for good.
        await self._redis.xgroup_create(key, REPLAY_GROUP, id="0", mkstream=True)
        await self._publisher.publish(
            channels.STREAM_SUBSCRIBE,
            {
                "subscription_id": subscription_id,
                "entity_type": entity_type,
                "since": job.since.isoformat(),
                "until": job.until.isoformat(),
                "channel": channel,
            },
        )
        last_data = last_heartbeat = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now - last_heartbeat >= self.heartbeat_s:
                    last_heartbeat = now
                    await self._publisher.publish(
                        channels.STREAM_HEARTBEAT, {"subscription_id": subscription_id}
                    )
                if now - last_data > self.idle_timeout_s:
                    raise BackfillFailed("the database did not replay (no data, no end marker)")
                try:
                    reply: Any = await self._redis.xreadgroup(
                        REPLAY_GROUP, REPLAY_GROUP, {key: ">"}, count=1000, block=500, noack=True
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    raise BackfillFailed("the replay stream was lost (Redis restarted)") from exc
                if not reply:
                    continue
                last_data = time.monotonic()
                for _, fields in reply[0][1]:
                    if self._collect(fields.get(FIELD, b""), entity_type, needed, work.add):
                        return
                    if work.held > self.max_events:
                        raise BackfillTooLarge(
                            f"more than {self.max_events} replayed events waiting for their "
                            "turn in publication order (CALCULATION_BACKFILL_MAX_EVENTS)"
                        )
        finally:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._publisher.publish(
                    channels.STREAM_UNSUBSCRIBE, {"subscription_id": subscription_id}
                )
                await self._redis.delete(key)

    @staticmethod
    def _collect(
        raw: bytes, entity_type: str, needed: frozenset[str], add: Callable[[EntityEvent], None]
    ) -> bool:
        """Pass one replayed item's event to `add`; True at the end marker. An end marker with
        a `reason` (`timeout`: the database missed our heartbeats) ends the replay before the
        end of its history: `BackfillFailed`, so the attempt is retried, not completed with
        part of the events."""
        try:
            envelope = Event.model_validate_json(raw)
        except ValidationError:
            return False
        payload = envelope.payload
        if payload.get("done") is True:
            reason = payload.get("reason")
            if reason is not None:
                raise BackfillFailed(
                    f"the database ended the replay early ({str(reason)[:100]}) after "
                    f"{payload.get('count')} events"
                )
            return True
        inner = payload.get("event")
        if not isinstance(inner, dict):
            return False
        try:
            original = Event.model_validate(inner)
            view = entity_event(original)
        except (ValidationError, InvalidEntityEvent):
            return False  # deactivations and malformed rows do not aggregate
        if view.entity_type != entity_type:
            return False
        attrs = {k: v for k, v in view.attributes.items() if k in needed}
        add(
            EntityEvent(
                view.event_id,
                view.event_kind,
                view.entity_type,
                view.entity_id,
                view.version,
                view.occurred_at,
                view.published_at,
                attrs,
            )
        )
        return False
