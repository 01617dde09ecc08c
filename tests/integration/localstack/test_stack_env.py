"""`.run/stack.env` of `analytics-engine up`: tools get the least-privileged `cli` Redis user
as `REDIS_URL`, and `REDIS_ADMIN_URL` for what `cli` may not do, such as watching the event
channels (`redis-cli SUBSCRIBE simulation.entity.created`, docs/protocol.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

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
