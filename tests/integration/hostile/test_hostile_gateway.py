"""The gateway under hostile HTTP: no auth bypass, no 5xx, oversized bodies refused.

The route list comes from the gateway's own OpenAPI document (`security: []` marks an open
route, `x-required-scope` the scope of the others), so a new route is covered without editing
this file. schemathesis generates valid and invalid requests for every operation, sent
without credentials and with a read key, against the whole platform (`platform` fixture:
every service in-process on real Redis, PostgreSQL and S3).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import requests
import schemathesis
from hostile_platform import ADMIN_KEY, READ_KEY, Platform
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES_PER_OPERATION = 8
SAMPLE_PATH_VALUES = {"code": "orders_count", "entity_type": "order", "entity_id": "o-1"}


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
    ]


def is_open(op: dict[str, Any]) -> bool:
    return op.get("security") == []


def is_stream(path: str) -> bool:
    return path.endswith("/stream")


def concrete(path: str) -> str:
    return re.sub(r"{([^}]+)}", lambda m: SAMPLE_PATH_VALUES[m.group(1)], path)


async def fetch_document(platform: Platform) -> dict[str, Any]:
    async with platform.http.get(f"{platform.url('gateway')}/api/v1/openapi.json") as resp:
        assert resp.status == 200  # open: no key needed
        document: dict[str, Any] = await resp.json()
    return document


async def call(
    platform: Platform,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    url = f"{platform.url('gateway')}{path}"
    async with platform.http.request(
        method, url, headers=headers or {}, timeout=aiohttp.ClientTimeout(total=15), **kwargs
    ) as resp:
        body: Any = None
        if resp.content_type == "application/json":
            body = await resp.json()
        return resp.status, body


def body_for(op: dict[str, Any]) -> Any:
    return {"rate": 1.0} if "requestBody" in op else None


async def test_every_protected_route_needs_a_key_and_every_write_an_admin_key(
    platform: Platform,
) -> None:
    document = await fetch_document(platform)
    ops = operations(document)
    protected = [(m, p, op) for m, p, op in ops if not is_open(op)]
    writes = [(m, p, op) for m, p, op in protected if op.get("x-required-scope") == "admin"]
    assert len(protected) >= 15 and len(writes) >= 5, (len(protected), len(writes))
    bad_credentials: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Basic {ADMIN_KEY}"},
        {"Authorization": f"bearer{ADMIN_KEY}"},
        {"Authorization": f"Bearer {ADMIN_KEY[:-1]}"},
        {"Authorization": f"Bearer {ADMIN_KEY}x"},
        {"X-API-Key": ""},
        # (`f"{ADMIN_KEY} "` is the key itself: HTTP strips a header value's outer spaces)
        {"X-API-Key": f"{ADMIN_KEY}\t\t x"},
        {"X-API-Key": ADMIN_KEY.upper()},
    ]
    checked = 0
    for method, path, op in protected:
        url = concrete(path)
        for headers in bad_credentials:
            status, body = await call(platform, method, url, headers=headers, json=body_for(op))
            assert status == 401, (method, url, headers, status, body)
            assert body["error"]["code"] == "unauthorized", body
            checked += 1
        if is_stream(path):  # a stream's token is checked like a key
            status, _ = await call(platform, method, f"{url}?token=forged.token.value")
            assert status == 401, (method, url)
    for method, path, op in writes:
        url = concrete(path)
        for header in ({"Authorization": f"Bearer {READ_KEY}"}, {"X-API-Key": READ_KEY}):
            status, body = await call(platform, method, url, headers=header, json=body_for(op))
            assert status == 403, (method, url, status, body)
            assert body["error"]["code"] == "forbidden", body
            checked += 1
    # the simulator never started: no read-key write got through
    status, sim = await call(platform, "GET", "/api/v1/simulator", headers={"X-API-Key": READ_KEY})
    assert status == 200 and sim["running"] is False, sim
    # the open routes answer without a key
    for method, path, op in ops:
        if is_open(op):
            status, _ = await call(platform, method, concrete(path))
            assert status in (200, 503), (method, path, status)
    print(f"\nauth matrix: {checked} requests on {len(protected)} protected routes")


async def test_path_and_method_tricks_do_not_bypass_auth(platform: Platform) -> None:
    document = await fetch_document(platform)
    tried = 0
    for method, path, op in operations(document):
        if is_open(op):
            continue
        url = concrete(path)
        variants = {
            url + "/",
            "/" + url,
            url.replace("/api/v1/", "/api/v1//"),
            url.replace("/api/v1/", "/api/v1/./"),
            url.replace("/api/v1/", "/api/v2/../v1/"),
            url.replace("/api/", "/API/"),
            url.replace("/api/v1/", "/api/v1/%2e/"),
            url.replace("/api/", "/%61pi/"),
            url + "%00",
            url + "?x=%00",
            url + "#frag",
            url + ";x=1",
        }
        for variant in sorted(variants):
            for verb in {method, "HEAD", "PATCH", "OPTIONS", "TRACE"}:
                status, body = await call(platform, verb, variant, json=body_for(op))
                tried += 1
                assert (status >= 400 and status < 500) or (verb == "OPTIONS" and status == 204), (
                    verb,
                    variant,
                    status,
                    body,
                )
                assert not (200 <= status < 300 and verb != "OPTIONS"), (verb, variant, status)
    await platform.assert_alive()
    print(f"\npath tricks: {tried} requests, none served without a key")


def _fuzz_operations(
    base: str, document: dict[str, Any], headers: dict[str, str], *, skip_streams: bool
) -> tuple[dict[str, int], list[str]]:
    """schemathesis over every operation (blocking: run in a thread)."""
    schema = schemathesis.openapi.from_dict(document)
    session = requests.Session()
    session.headers.update(headers)
    scopes = {
        (m, p): op.get("x-required-scope") for m, p, op in operations(document) if not is_open(op)
    }
    keyed = bool(headers)
    counts: dict[str, int] = {}
    by_scope: dict[str, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        if skip_streams and is_stream(operation.path):
            continue  # with a valid read key a stream never ends
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                # schemathesis would add no credentials itself; make sure of it
                for name in ("Authorization", "X-API-Key", "authorization", "x-api-key"):
                    if case.headers and name in case.headers and not keyed:
                        del case.headers[name]
                if case.query and not keyed:
                    case.query.pop("token", None)
                scope = scopes.get((case.method.upper(), case.operation.path))
                response = case.call(base_url=base, session=session, timeout=15)
                label = f"{case.method} {case.path}"
                counts[label] = counts.get(label, 0) + 1
                by_scope[str(scope)] = by_scope.get(str(scope), 0) + 1
                status = response.status_code
                where = f"{label} -> {status} {response.text[:200]} (path {case.path_parameters})"
                if status >= 500:
                    failures.append(f"5xx: {where}")
                elif scope is not None and not keyed and status < 400:
                    failures.append(f"served without a key: {where}")
                elif scope == "admin" and keyed and status < 400:
                    failures.append(f"write served to a read key: {where}")
                elif scope is not None and not keyed and status in (403,):
                    failures.append(f"403 instead of 401 without a key: {where}")

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label
    # the scope lookup works: protected and admin operations were judged as such
    assert by_scope.get("read", 0) > 50 and by_scope.get("admin", 0) > 30, by_scope
    return counts, failures


async def test_schemathesis_without_credentials_and_with_a_read_key(platform: Platform) -> None:
    started = time.monotonic()
    document = await fetch_document(platform)
    base = platform.url("gateway")
    summary = []
    for headers, skip_streams in (({}, False), ({"X-API-Key": READ_KEY}, True)):
        counts, failures = await asyncio.to_thread(
            _fuzz_operations, base, document, headers, skip_streams=skip_streams
        )
        assert not failures, "\n".join(failures[:20])
        assert sum(counts.values()) >= 100, counts
        summary.append(f"{sum(counts.values())} requests on {len(counts)} operations")
    await platform.assert_alive()
    _, sim = await call(platform, "GET", "/api/v1/simulator", headers={"X-API-Key": READ_KEY})
    assert sim["running"] is False, sim  # no write slipped through
    print(
        f"\nschemathesis: no key {summary[0]}; read key {summary[1]}; "
        f"{time.monotonic() - started:.1f}s"
    )


async def test_oversized_bodies_get_413_json(platform: Platform) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    limit = 256 * 1024  # GATEWAY_MAX_BODY_BYTES default
    big = b'{"rate": 1.0, "pad": "' + b"x" * (limit + 1024) + b'"}'
    huge = b"[" + b"1," * (3 * 1024 * 1024) + b"1]"
    for method, path in (
        ("PUT", "/api/v1/simulator/rate"),
        ("PUT", "/api/v1/kpi-definitions/orders_count"),
    ):
        for data in (big, huge):
            status, body = await call(
                platform,
                method,
                path,
                headers={**admin, "Content-Type": "application/json"},
                data=data,
            )
            assert status == 413, (method, path, status, body)
            assert body["error"]["code"], body

        async def chunks(payload: bytes = big) -> Any:
            for i in range(0, len(payload), 64 * 1024):
                yield payload[i : i + 64 * 1024]

        # no Content-Length: the limit still applies while the body streams in
        status, body = await call(
            platform,
            method,
            path,
            headers={**admin, "Content-Type": "application/json"},
            data=chunks(),
        )
        assert status == 413, (method, path, "chunked", status, body)
        # without a key or with a read key the body is never read: 401 / 403 first
        status, _ = await call(platform, method, path, data=big)
        assert status == 401
        status, _ = await call(platform, method, path, headers={"X-API-Key": READ_KEY}, data=big)
        assert status == 403
    await platform.assert_alive()
    # the metadata service behind it caps bodies on its own too
    async with platform.http.put(
        f"{platform.url('metadata')}/api/v1/kpi-definitions/orders_count",
        data=big,
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413, resp.status
