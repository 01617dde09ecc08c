"""Request/reply over Redis pub/sub, as the spec's "Request/Reply Pattern" describes.

The requester PUBLISHes a `Request` on the request channel and waits on its own reply channel
`reply.{service}.{instance}`; the responder PUBLISHes a `Response` to `reply_to`.

Two guarantees on top of plain pub/sub:
- *exactly one execution with replicas*: every replica of a responder receives the request, and
  the first to `SET NX` the request's claim key executes it;
- *no work for a caller that left*: a caller that times out or is cancelled takes the claim key
  itself, and responders skip requests whose `deadline` has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from analytics_engine.core.bus import (
    REDIS_ERRORS,
    DeadLetters,
    LiveSubscription,
)
from analytics_engine.core.channels import request_claim_key
from analytics_engine.core.coalesce import Coalescer
from analytics_engine.core.envelopes import (
    MalformedMessage,
    Request,
    Response,
    assemble,
    dumps,
    new_id,
    parse_json_object,
    parse_request,
    parse_response,
    utcnow,
    validation_summary,
)
from analytics_engine.core.errors import (
    HandlerError,
    NoResponder,
    RemoteError,
    RequestTimeout,
    TransientError,
)
from analytics_engine.core.logs import correlation_id_var
from analytics_engine.core.redis import CommandLine

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from analytics_engine.core.metrics import CoreMetrics

log = logging.getLogger(__name__)

RequestHandler = Callable[[Request], Awaitable[Mapping[str, Any]]]

REPLY_PREFIX = "reply."
CLAIM_TTL_MS = 120_000

# A responder claims and answers in batches (`Coalescer`): every claim made while the previous
# batch was in flight goes out in the next one, pipelined on a connection of its own
# (`CommandLine`), and so do the replies. A lone request pays one plain round trip per step.


def request_correlation_id(context: str | None) -> str:
    """A new request's correlation id: unique per request, since responders claim requests by
    it (`ae:rr:claim:{id}`, kept 120 s), and prefixed by the id of the work in hand (the event
    or request being handled) so the logs join up. Taking the context's id itself made a
    handler's second request, or any request of a redelivered event, a claimed duplicate that
    no responder ran."""
    return f"{context[:160]}.{new_id()[:12]}" if context else new_id()


class RequestReplyClient:
    """Sends requests and matches replies to callers by `correlation_id`."""

    def __init__(
        self,
        redis: Redis,
        *,
        service: str,
        instance: str,
        default_timeout: float = 10.0,
        metrics: CoreMetrics | None = None,
    ) -> None:
        self._redis = redis
        self._service = service
        self.reply_to = f"{REPLY_PREFIX}{service}.{instance}"
        self._default_timeout = default_timeout
        self._metrics = metrics
        self._pending: dict[str, asyncio.Future[Response]] = {}
        self._subscription = LiveSubscription(redis, self._on_reply, channels=[self.reply_to])
        self._line = CommandLine(redis)
        self._publishes: Coalescer[tuple[str, bytes], int] = Coalescer(self._publish_many)
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self._subscription.start()
        await self._subscription.subscribed.wait()

    async def close(self) -> None:
        await self._subscription.stop()
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        await self._publishes.close()
        await self._line.close()
        self._started = False

    async def _publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[int]:
        """PUBLISH each (channel, message); the number of subscribers each reached."""
        replies = await self._line.execute([("PUBLISH", ch, body) for ch, body in messages])
        return [int(n) for n in replies]

    def _on_reply(self, raw: bytes) -> None:
        try:
            response = parse_response(raw)
        except MalformedMessage:
            log.warning("ignored a malformed reply", extra={"reply_to": self.reply_to})
            return
        future = self._pending.get(response.correlation_id)
        if future is not None and not future.done():
            future.set_result(response)

    async def request(
        self,
        channel: str,
        request_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        correlation_id: str | None = None,
    ) -> dict[str, Any]:
        """Send a request and return the reply's payload.

        Raises `NoResponder` (nobody subscribed to `channel`), `RequestTimeout`, or
        `RemoteError` (error reply, with its `code`).
        """
        timeout = self._default_timeout if timeout is None else timeout
        if not self._subscription.subscribed.is_set():
            try:
                await asyncio.wait_for(self.start(), timeout)
            except TimeoutError:
                raise RequestTimeout(
                    f"the bus is unreachable: cannot listen on {self.reply_to}"
                ) from None
        cid = correlation_id or request_correlation_id(correlation_id_var.get())
        if cid in self._pending:
            cid = new_id()
        now = utcnow()
        request = assemble(
            Request,
            {
                "correlation_id": cid,
                "reply_to": self.reply_to,
                "request_type": request_type,
                "source": self._service,
                "timestamp": now,
                "payload": dict(payload or {}),
                "deadline": now + timedelta(seconds=timeout),
            },
        )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Response] = loop.create_future()
        # a timer on the future itself: cheaper than `wait_for`, which adds a future and a hop
        timer = loop.call_later(timeout, _expire, future)
        self._pending[cid] = future
        started = time.perf_counter()
        outcome = "error"
        try:
            receivers = await self._publishes.submit((channel, dumps(request)))
            if receivers == 0:
                outcome = "no_responder"
                raise NoResponder(f"no service is listening on {channel}")
            try:
                response = await future
            except TimeoutError:
                outcome = "timeout"
                await self._abandon(cid)
                raise RequestTimeout(
                    f"{request_type} on {channel} got no reply within {timeout:g}s"
                ) from None
            if response.error is not None:
                outcome = "error_reply"
                raise RemoteError(response.error, code=response.error_code)
            outcome = "ok"
            return response.payload or {}
        except asyncio.CancelledError:
            outcome = "cancelled"
            with contextlib.suppress(*REDIS_ERRORS):
                await asyncio.shield(self._abandon(cid))
            raise
        finally:
            timer.cancel()
            self._pending.pop(cid, None)
            if self._metrics is not None:
                self._metrics.request_seconds.labels(channel, request_type, outcome).observe(
                    time.perf_counter() - started
                )

    async def _abandon(self, cid: str) -> None:
        """Take the claim so no responder starts a request nobody waits for any more."""
        await self._redis.set(request_claim_key(cid), b"abandoned", nx=True, px=CLAIM_TTL_MS)


class RequestReplyServer:
    """Answers requests on one channel with the handler registered for each `request_type`."""

    def __init__(
        self,
        redis: Redis,
        *,
        channel: str,
        source: str,
        instance: str,
        handlers: Mapping[str, RequestHandler],
        dead_letters: DeadLetters,
        concurrency: int = 64,
        metrics: CoreMetrics | None = None,
        payload_models: Mapping[str, type[BaseModel]] | None = None,
    ) -> None:
        self._redis = redis
        self.channel = channel
        self._payload_models = dict(payload_models or {})
        self._source = source
        self._instance = instance.encode()
        self._handlers = dict(handlers)
        self._dead = dead_letters
        self._limit = asyncio.Semaphore(concurrency)
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscription = LiveSubscription(redis, self._on_message, channels=[channel])
        self._claim_line = CommandLine(redis)
        self._reply_line = CommandLine(redis)
        self._claims: Coalescer[str, bool] = Coalescer(self._claim_many)
        self._replies: Coalescer[tuple[str, bytes], None] = Coalescer(self._reply_many)

    @property
    def subscribed(self) -> asyncio.Event:
        return self._subscription.subscribed

    async def start(self) -> None:
        await self._subscription.start()

    async def stop(self, *, grace: float = 10.0) -> None:
        """Stop receiving, then let in-flight requests finish (up to `grace` seconds)."""
        await self._subscription.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        await self._claims.close()
        await self._replies.close()
        await self._claim_line.close()
        await self._reply_line.close()

    def _on_message(self, raw: bytes) -> None:
        task = asyncio.create_task(self._serve(raw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, raw: bytes) -> None:
        try:
            request = parse_request(raw)
        except MalformedMessage as exc:
            await self._reject_malformed(raw, f"invalid request: {exc}")
            return
        if not request.reply_to.startswith(REPLY_PREFIX):
            await self._reject_malformed(raw, f"reply_to must start with {REPLY_PREFIX!r}")
            return
        token = correlation_id_var.set(request.correlation_id)
        try:
            # Claim only once a slot is free: a busy replica leaves the request to an idle one,
            # and a request whose caller gave up while we waited is never started.
            async with self._limit:
                if request.deadline is not None and request.deadline <= utcnow():
                    self._count(request, "expired")
                    return
                if not await self._claim(request.correlation_id):
                    return  # another replica has it, or its caller already gave up
                response = await self._execute(request)
            with contextlib.suppress(*REDIS_ERRORS):
                await self._replies.submit((request.reply_to, dumps(response)))
        finally:
            correlation_id_var.reset(token)

    async def _claim(self, correlation_id: str) -> bool:
        try:
            return await self._claims.submit(request_claim_key(correlation_id))
        except REDIS_ERRORS:
            log.warning("cannot claim request, redis unavailable")
            return False

    async def _claim_many(self, keys: Sequence[str]) -> list[bool]:
        claims = [("SET", key, self._instance, "NX", "PX", CLAIM_TTL_MS) for key in keys]
        return [bool(reply) for reply in await self._claim_line.execute(claims)]

    async def _reply_many(self, replies: Sequence[tuple[str, bytes]]) -> list[None]:
        await self._reply_line.execute([("PUBLISH", to, body) for to, body in replies])
        return [None] * len(replies)

    async def _execute(self, request: Request) -> Response:
        handler = self._handlers.get(request.request_type)
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            self._count(request, "unknown_type")
            return self._error(
                request,
                f"unknown request_type {request.request_type!r} on {self.channel}; "
                f"expected one of: {known}",
                "unknown_request_type",
            )
        model = self._payload_models.get(request.request_type)
        if model is not None:
            try:  # the protocol's payload rules (core/payloads.py), before any handler runs
                model.model_validate(request.payload)
            except ValidationError as exc:
                self._count(request, "rejected")
                return self._error(
                    request, f"invalid payload: {validation_summary(exc)}", "invalid_request"
                )
        started = time.perf_counter()
        try:
            payload = await handler(request)
        except HandlerError as exc:
            self._count(request, "rejected")
            return self._error(request, exc.message, exc.code)
        except TransientError as exc:
            self._count(request, "unavailable")
            return self._error(request, f"temporarily unavailable: {exc}", "unavailable")
        except Exception:
            log.exception("request handler failed", extra={"request_type": request.request_type})
            self._count(request, "failed")
            return self._error(request, "internal error while handling the request", "internal")
        finally:
            if self._metrics is not None:
                self._metrics.handle_seconds.labels(self.channel, request.request_type).observe(
                    time.perf_counter() - started
                )
        self._count(request, "ok")
        return self._response(request.correlation_id, payload=dict(payload))

    def _error(self, request: Request, message: str, code: str) -> Response:
        return self._response(request.correlation_id, error=message, error_code=code)

    def _response(
        self,
        correlation_id: str,
        *,
        payload: dict[str, Any] | None = None,
        error: str | None = None,
        error_code: str | None = None,
    ) -> Response:
        fields = {
            "correlation_id": correlation_id,
            "source": self._source,
            "timestamp": utcnow(),
            "payload": payload,
            "error": error,
            "error_code": error_code,
        }
        return assemble(Response, fields)

    def _count(self, request: Request, outcome: str) -> None:
        if self._metrics is not None:
            label = request.request_type if request.request_type in self._handlers else "unknown"
            self._metrics.requests_handled.labels(self.channel, label, outcome).inc()

    async def _reject_malformed(self, raw: bytes, reason: str) -> None:
        """Answer a malformed request when it names a usable reply channel; record it always.

        Malformed requests reach every replica; the dead-letter entry is written once, by the
        replica that wins the claim on a digest of the message.
        """
        data = parse_json_object(raw) or {}
        reply_to = data.get("reply_to")
        cid = data.get("correlation_id")
        claim = request_claim_key(f"malformed:{hash_bytes(raw)}")
        try:
            if not await self._redis.set(claim, self._instance, nx=True, px=CLAIM_TTL_MS):
                return
            await self._dead.add(channel=self.channel, reason=reason, original=raw, kind="request")
            if isinstance(reply_to, str) and reply_to.startswith(REPLY_PREFIX):
                response = self._response(
                    str(cid) if isinstance(cid, str | int) and cid != "" else "",
                    error=reason,
                    error_code="invalid_request",
                )
                await self._redis.publish(reply_to, dumps(response))
        except REDIS_ERRORS:
            log.warning("could not record a malformed request, redis unavailable")
        if self._metrics is not None:
            self._metrics.requests_handled.labels(self.channel, "unknown", "malformed").inc()


def _expire(future: asyncio.Future[Response]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def hash_bytes(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()
