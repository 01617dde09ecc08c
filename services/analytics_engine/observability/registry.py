"""What the observability service knows, as pure state: fed by messages, read by the status API.

No I/O here: the service feeds it heartbeats and KPI results with their arrival time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

FORGET_AFTER_S: Final = 3600.0
"""An instance silent this long is forgotten (each pod restart is a new instance)."""


@dataclass
class InstanceState:
    service: str
    instance: str
    version: str
    status: str
    uptime_s: float
    consumer_lag: dict[str, int]
    last_seen: float  # monotonic seconds


@dataclass
class KPIState:
    code: str
    last_window_end: datetime
    last_value: float
    last_received: float  # monotonic
    freshness_s: float  # window close -> received, of the last result
    results: int = 0


@dataclass
class RateMeter:
    """Messages per second over a sliding interval, counted in one-second buckets."""

    interval_s: int = 10
    _buckets: deque[list[float]] = field(default_factory=deque)  # [second, count]
    last_added: float = 0.0

    def add(self, now: float, count: int = 1) -> None:
        self.last_added = now
        second = float(int(now))
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([second, float(count)])
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        return sum(count for _, count in self._buckets) / self.interval_s

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.interval_s:
            self._buckets.popleft()


class Registry:
    """Services and their instances, KPI freshness, message rates."""

    def __init__(
        self,
        *,
        missing_after_s: float,
        expected: Collection[str] = (),
        started: float | None = None,
        forget_after_s: float = FORGET_AFTER_S,
    ) -> None:
        """`expected`: the services deployed; one never heard from is reported missing once
        the registry has listened for `missing_after_s` since `started` (monotonic; None: not
        listening yet), so that a service down since before an observability restart still
        shows. An instance silent for `forget_after_s` is forgotten: the registry holds the
        instances of the last hour, not every pod that ever ran, and a service no longer run
        stops being listed (an expected one is still reported missing)."""
        self.missing_after_s = missing_after_s
        self.forget_after_s = max(forget_after_s, missing_after_s)
        self._forgotten_at: float | None = None
        self.expected = frozenset(expected)
        self.started = started
        self.instances: dict[tuple[str, str], InstanceState] = {}
        self.kpis: dict[str, KPIState] = {}
        self.rates: dict[str, RateMeter] = {}

    def _forget(self, now: float) -> None:
        """Drop the instances silent for `forget_after_s` (a scan at most once a second)."""
        if self._forgotten_at is not None and now - self._forgotten_at < 1.0:
            return
        self._forgotten_at = now
        gone = [k for k, s in self.instances.items() if now - s.last_seen > self.forget_after_s]
        for key in gone:
            del self.instances[key]

    def heartbeat(self, payload: dict[str, Any], *, now: float) -> None:
        self._forget(now)
        key = (str(payload["service"]), str(payload["instance"]))
        self.instances[key] = InstanceState(
            service=key[0],
            instance=key[1],
            version=str(payload.get("version", "")),
            status=str(payload.get("status", "running")),
            uptime_s=float(payload.get("uptime_s", 0.0)),
            consumer_lag={str(k): int(v) for k, v in dict(payload.get("consumer_lag", {})).items()},
            last_seen=now,
        )

    def kpi_result(
        self, code: str, *, value: float, window_end: datetime, received: datetime, now: float
    ) -> None:
        state = self.kpis.get(code)
        freshness = max(0.0, (received - window_end).total_seconds())
        if state is None or window_end >= state.last_window_end:
            self.kpis[code] = KPIState(
                code=code,
                last_window_end=window_end,
                last_value=value,
                last_received=now,
                freshness_s=freshness,
                results=(state.results if state else 0) + 1,
            )
        else:
            state.results += 1

    def count(self, channel: str, *, now: float, n: int = 1) -> None:
        self.rates.setdefault(channel, RateMeter()).add(now, n)

    def is_up(self, state: InstanceState, *, now: float) -> bool:
        return now - state.last_seen <= self.missing_after_s and state.status != "stopping"

    def services(self, *, now: float) -> list[dict[str, Any]]:
        """One entry per service: up when any instance is up, with each instance's detail."""
        self._forget(now)
        by_service: dict[str, list[InstanceState]] = {}
        for state in self.instances.values():
            by_service.setdefault(state.service, []).append(state)
        out = []
        for service, states in sorted(by_service.items()):
            instances = [
                {
                    "instance": s.instance,
                    "status": "up" if self.is_up(s, now=now) else "missing",
                    "version": s.version,
                    "uptime_s": s.uptime_s,
                    "last_seen_s_ago": round(now - s.last_seen, 3),
                    "consumer_lag": s.consumer_lag,
                }
                for s in sorted(states, key=lambda s: s.instance)
            ]
            up = any(i["status"] == "up" for i in instances)
            lag: dict[str, int] = {}
            for s in states:
                if self.is_up(s, now=now):
                    for channel, n in s.consumer_lag.items():
                        lag[channel] = max(lag.get(channel, 0), n)
            out.append(
                {
                    "service": service,
                    "status": "up" if up else "missing",
                    "instances": instances,
                    "consumer_lag": lag,
                }
            )
        if self.started is not None and now - self.started >= self.missing_after_s:
            unheard = self.expected - by_service.keys()
            out.extend(
                {"service": service, "status": "missing", "instances": [], "consumer_lag": {}}
                for service in unheard
            )
            out.sort(key=lambda entry: str(entry["service"]))
        return out

    def kpi_freshness(self, *, now: float) -> list[dict[str, Any]]:
        return [
            {
                "kpi_code": k.code,
                "last_window_end": k.last_window_end.isoformat(),
                "last_value": k.last_value,
                "freshness_s": round(k.freshness_s, 4),
                "seconds_since_last_result": round(now - k.last_received, 3),
                "results": k.results,
            }
            for k in sorted(self.kpis.values(), key=lambda k: k.code)
        ]

    def message_rates(self, *, now: float) -> dict[str, float]:
        """Per channel; a channel without a message for `forget_after_s` is forgotten (each
        backfill replays into a channel of its own)."""
        gone = [c for c, m in self.rates.items() if now - m.last_added > self.forget_after_s]
        for channel in gone:
            del self.rates[channel]
        return {channel: round(m.rate(now), 2) for channel, m in sorted(self.rates.items())}
