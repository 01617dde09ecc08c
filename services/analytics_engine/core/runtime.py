"""The service runtime: lifecycle, HTTP health/metrics endpoints, heartbeats, graceful shutdown.

A service is a thin composition: build a `ServiceRuntime`, register consumers, responders,
background tasks and HTTP routes on it, then `await runtime.run()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from analytics_engine import __version__
from analytics_engine.core.bus import (
    REDIS_ERRORS,
    BatchHandler,
    DeadLetters,
    DurableConsumer,
    EventPublisher,
    LiveSubscription,
)
from analytics_engine.core.channels import SERVICE_HEARTBEAT
from analytics_engine.core.envelopes import utcnow
from analytics_engine.core.heap import tune_gc
from analytics_engine.core.metrics import CoreMetrics
from analytics_engine.core.payloads import REQUEST_PAYLOADS
from analytics_engine.core.redis import connect
from analytics_engine.core.request_reply import (
    RequestHandler,
    RequestReplyClient,
    RequestReplyServer,
)

if TYPE_CHECKING:
    from analytics_engine.core.settings import BaseServiceSettings

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]
ReadinessCheck = Callable[[], Awaitable[bool]]


class ServiceRuntime:
    def __init__(
        self,
        *,
        service: str,
        settings: BaseServiceSettings,
        port: int,
        host: str | None = None,
        client_max_size: int = 1024 * 1024,
    ) -> None:
        self.service = service
        self.settings = settings
        self.instance = settings.instance_id
        self.host = host if host is not None else settings.http_host
        self.port = port
        self.metrics = CoreMetrics()
        self._stop = asyncio.Event()
        self.redis = connect(str(settings.redis_url))
        self._stream_redis = connect(str(settings.redis_url), retries=0)
        self.publisher = EventPublisher(
            self.redis,
            source=service,
            stream_maxlen=settings.stream_maxlen,
            metrics=self.metrics,
            stopping=self._stop,
        )
        self.dead_letters = DeadLetters(self.redis, service=service, metrics=self.metrics)
        self.http = web.Application(client_max_size=client_max_size)
        self.http.router.add_get("/healthz", self._healthz)
        self.http.router.add_get("/readyz", self._readyz)
        self.http.router.add_get("/metrics", self._metrics)
        self.ready = asyncio.Event()
        self.bound_port: int | None = None
        self._started_at = time.monotonic()
        self._consumers: list[DurableConsumer] = []
        self._servers: list[RequestReplyServer] = []
        self._subscriptions: list[LiveSubscription] = []
        self._tasks: list[tuple[str, Hook]] = []
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._checks: dict[str, ReadinessCheck] = {}
        self._client: RequestReplyClient | None = None
        self._status = "starting"

    # -- composition -----------------------------------------------------------------------
    def consume(
        self,
        channels: Sequence[str],
        handler: BatchHandler,
        *,
        group: str | None = None,
        consumer: str | None = None,
        auto_ack: bool = True,
        batch_size: int | None = None,
        linger_ms: int = 0,
        lazy_events: bool = False,
        checkpointed: bool = False,
        read_ahead: bool = False,
    ) -> DurableConsumer:
        """Read durable channels with this service's consumer group (replicas share work);
        `linger_ms`, `lazy_events`, `checkpointed` and `read_ahead` as in `DurableConsumer`."""
        s = self.settings
        consumer_ = DurableConsumer(
            self._stream_redis,
            channels=channels,
            group=group or self.service,
            consumer=consumer or self.instance,
            handler=handler,
            dead_letters=self.dead_letters,
            batch_size=batch_size or s.consumer_batch_size,
            max_deliveries=s.max_deliveries,
            claim_idle_ms=s.claim_idle_ms,
            auto_ack=auto_ack,
            linger_ms=linger_ms,
            metrics=self.metrics,
            lazy_events=lazy_events,
            checkpointed=checkpointed,
            read_ahead=read_ahead,
        )
        self._consumers.append(consumer_)
        return consumer_

    def respond(
        self,
        channel: str,
        handlers: Mapping[str, RequestHandler],
        *,
        concurrency: int | None = None,
    ) -> RequestReplyServer:
        server = RequestReplyServer(
            self.redis,
            channel=channel,
            source=self.service,
            instance=self.instance,
            handlers=handlers,
            dead_letters=self.dead_letters,
            concurrency=concurrency or self.settings.request_concurrency,
            metrics=self.metrics,
            payload_models={t: m for (c, t), m in REQUEST_PAYLOADS.items() if c == channel},
        )
        self._servers.append(server)
        return server

    @property
    def requests(self) -> RequestReplyClient:
        """The request/reply client of this instance (`reply.{service}.{instance}`)."""
        if self._client is None:
            self._client = RequestReplyClient(
                self.redis,
                service=self.service,
                instance=self.instance,
                default_timeout=self.settings.request_timeout_s,
                metrics=self.metrics,
            )
        return self._client

    def listen(
        self,
        on_message: Callable[[bytes, bytes], None],
        *,
        channels: Sequence[str] = (),
        patterns: Sequence[str] = (),
    ) -> LiveSubscription:
        """Subscribe to live pub/sub channels or patterns; `on_message(channel, data)`."""
        subscription = LiveSubscription(
            self.redis, on_message, channels=channels, patterns=patterns, with_channel=True
        )
        self._subscriptions.append(subscription)
        return subscription

    def add_task(self, name: str, task: Hook) -> None:
        """A background loop; restarted with backoff if it crashes."""
        self._tasks.append((name, task))

    def on_startup(self, hook: Hook) -> None:
        self._startup.append(hook)

    def on_shutdown(self, hook: Hook) -> None:
        self._shutdown.append(hook)

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    def stop(self) -> None:
        self._stop.set()

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self, *, handle_signals: bool = False) -> None:
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        runner = web.AppRunner(
            self.http,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.settings.shutdown_grace_s,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.bound_port = _bound_port(runner) or self.port
        tasks: list[asyncio.Task[None]] = []
        consumer_tasks: list[asyncio.Task[None]] = []
        started = False
        try:
            for hook in self._startup:
                if not await _unless_stopped(hook, self._stop):
                    return  # told to stop while starting (e.g. waiting for a database)
            started = True
            tune_gc(self.settings.gc_threshold)  # what startup built lives as long as we do
            if not await _unless_stopped(self._subscribe, self._stop):
                return  # told to stop while Redis is unreachable: the finally stops us
            consumer_tasks = [
                asyncio.create_task(c.run(), name=f"consume:{','.join(c.channels)}")
                for c in self._consumers
            ]
            tasks = [
                asyncio.create_task(self._supervise(name, fn), name=name)
                for name, fn in self._tasks
            ]
            if not await _until_ready(self._consumers, consumer_tasks, self._stop):
                return  # told to stop while starting (Redis unreachable): the finally stops us
            tasks.append(asyncio.create_task(self._heartbeats(), name="heartbeat"))
            self._status = "running"
            self.ready.set()
            log.info(
                "service started",
                extra={"port": self.bound_port, "version": __version__},
            )
            stop_wait = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait(
                [stop_wait, *consumer_tasks], return_when=asyncio.FIRST_COMPLETED
            )
            stop_wait.cancel()
            for task in done:
                if task is not stop_wait and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            # Not ready from now on (/readyz answers 503 while the work in hand drains), and
            # loops waiting on `stopping` end even when a crashed consumer, not stop(), ended us.
            self._status = "stopping"
            self.ready.clear()
            self._stop.set()
            log.info("service stopping")
            for server in self._servers:
                await server.stop()
            for subscription in self._subscriptions:
                await subscription.stop()
            for consumer in self._consumers:
                consumer.stop()
            if consumer_tasks:
                await asyncio.wait(consumer_tasks, timeout=30)
            await _cancel_all(tasks)
            # HTTP next: stop listening, run the app's on_shutdown (long-lived streams end
            # there), and let requests in flight finish within the grace, while what they use
            # (the request/reply client, Redis, what the shutdown hooks close) is still open.
            await runner.cleanup()
            # A shutdown hook may rely on the startup having run: the calculation engine's
            # final checkpoint, written over a state that was never loaded, would erase it.
            for hook in reversed(self._shutdown if started else ()):
                try:
                    await hook()
                except Exception:
                    log.exception("shutdown hook failed")
            if not started and self._shutdown:
                log.info("startup did not complete: shutdown hooks skipped")
            if self._client is not None:
                await self._client.close()
            await self.redis.aclose()
            await self._stream_redis.aclose()
            log.info("service stopped")

    async def _subscribe(self) -> None:
        """Subscribe the responders, live subscriptions and the reply channel (each waits
        until Redis answers)."""
        for server in self._servers:
            await server.start()
        for subscription in self._subscriptions:
            await subscription.start()
        if self._client is not None:
            await self._client.start()

    async def _supervise(self, name: str, fn: Hook) -> None:
        backoff = 0.5
        while True:
            try:
                await fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task crashed, restarting", extra={"task": name})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while not self._stop.is_set():
            try:
                await self.publisher.publish(SERVICE_HEARTBEAT, await self.heartbeat())
            except REDIS_ERRORS:
                pass  # Redis is down: the observability service will report us missing
            except Exception:
                log.exception("cannot publish a heartbeat")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the service begins to stop: background loops may wait on it."""
        return self._stop

    async def heartbeat(self) -> dict[str, object]:
        lag: dict[str, int] = {}
        for consumer in self._consumers:
            with contextlib.suppress(*REDIS_ERRORS):
                lag.update(await consumer.lag())
        return {
            "service": self.service,
            "instance": self.instance,
            "version": __version__,
            "status": self._status,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "consumer_lag": lag,
            "port": self.bound_port,
            "sent_at": utcnow().isoformat(),
        }

    # -- HTTP ------------------------------------------------------------------------------
    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": self.service})

    async def _readyz(self, _: web.Request) -> web.Response:
        if self._stop.is_set():  # stopping: no new work, whatever the checks would say
            return web.json_response(
                {"status": "stopping", "checks": {"started": self.ready.is_set()}}, status=503
            )
        checks: dict[str, bool] = {"started": self.ready.is_set()}
        try:
            checks["redis"] = bool(await asyncio.wait_for(self.redis.ping(), 2.0))
        except (TimeoutError, *REDIS_ERRORS):
            checks["redis"] = False
        for name, check in self._checks.items():
            try:
                checks[name] = bool(await asyncio.wait_for(check(), 2.0))
            except Exception:
                checks[name] = False
        ok = all(checks.values())
        return web.json_response(
            {"status": "ready" if ok else "not ready", "checks": checks},
            status=200 if ok else 503,
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None


async def _cancel_all(tasks: Sequence[asyncio.Task[None]], *, attempts: int = 10) -> None:
    """Cancel tasks and wait for them, cancelling again while any is still running.

    A cancellation that lands inside a redis-py call can be swallowed by the client (seen with
    redis-py 8.1), so one `cancel()` is not always enough to end a loop.
    """
    pending = {t for t in tasks if not t.done()}
    for _ in range(attempts):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    if pending:
        log.error("background tasks did not stop", extra={"tasks": [t.get_name() for t in pending]})
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())


async def _unless_stopped(hook: Hook, stop: asyncio.Event) -> bool:
    """Run a startup hook unless `stop` is set first (True when it completed). A hook that waits
    for a dependency (a database not up yet) is cancelled by the stop, so a SIGTERM at start is
    obeyed at once, not after the pod's grace period."""
    if stop.is_set():
        return False
    work = asyncio.ensure_future(hook())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([work, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if not work.cancelled() and (error := work.exception()) is not None:
        if stop.is_set():  # it failed while being stopped: the stop wins
            log.info("startup hook failed while stopping", extra={"error": str(error)[:200]})
            return False
        raise error
    return not work.cancelled()


async def _until_ready(
    consumers: Sequence[DurableConsumer],
    tasks: Sequence[asyncio.Task[None]],
    stop: asyncio.Event,
) -> bool:
    """Wait until every consumer has joined its group (True) or `stop` is set (False, so a
    SIGTERM while Redis is unreachable is not ignored); surface a consumer that crashed."""
    while not all(c.ready.is_set() for c in consumers):
        if stop.is_set():
            return False
        for task in tasks:
            if task.done():
                task.result()
        await asyncio.sleep(0.01)
    return True
