"""`.run/stack.env` of `analytics-engine up`: tools get the least-privileged `cli` Redis user
as `REDIS_URL`, and `REDIS_ADMIN_URL` for what `cli` may not do, such as watching the event
channels (`redis-cli SUBSCRIBE simulation.entity.created`, docs/protocol.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from analytics_engine.core.bus import FIELD, LIBRARY, LIBRARY_CODE, PUBLISH_FUNCTION
from analytics_engine.localstack.up import start_infra


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_stack_env_has_an_admin_url_that_can_watch_the_event_channels(tmp_path: Path) -> None:
    stack = start_infra(tmp_path)
    try:
        env = read_env(tmp_path / "stack.env")
        with redis.Redis.from_url(env["REDIS_URL"]) as cli:
            denied = cli.pubsub()
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied.subscribe("simulation.entity.created")
                denied.get_message(timeout=5)
            denied.close()
        assert env["REDIS_ADMIN_URL"] == stack.admin_redis_url
        with redis.Redis.from_url(env["REDIS_ADMIN_URL"]) as admin:
            subscription = admin.pubsub()
            subscription.subscribe("simulation.entity.created")
            assert subscription.get_message(timeout=5)["type"] == "subscribe"
            subscription.close()
    finally:
        stack.infra.stop()


def test_the_local_stack_loads_the_publish_function_its_services_call(tmp_path: Path) -> None:
    """`analytics-engine up`'s Redis: the admin user loaded the library (the services' users
    may not), each service publishes through it, and a restart keeps it (AOF)."""
    stack = start_infra(tmp_path)
    try:
        with redis.Redis.from_url(stack.redis_urls["simulator"]) as simulator:
            assert simulator.fcall(PUBLISH_FUNCTION, 0, FIELD) == []
            with pytest.raises(redis.exceptions.NoPermissionError):
                simulator.function_load(LIBRARY_CODE, replace=True)
        with redis.Redis.from_url(stack.admin_redis_url) as admin:
            (library,) = admin.function_list()  # RESP2: [name, value, name, value, ...]
            assert dict(zip(library[::2], library[1::2], strict=True))[b"library_name"] == (
                LIBRARY.encode()
            )
        stack.infra.redis.restart()
        with redis.Redis.from_url(stack.redis_urls["calculation"]) as calculation:
            assert calculation.fcall(PUBLISH_FUNCTION, 0, FIELD) == []
    finally:
        stack.infra.stop()
