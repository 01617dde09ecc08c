"""The platform's Redis ACL users on a test Redis: every service, password `pw-{service}`."""

from __future__ import annotations

from analytics_engine.localstack import RedisServer


def url(server: RedisServer, user: str) -> str:
    """The URL of `user` on a Redis started with `acl_redis` (`conftest.py`)."""
    return f"redis://{user}:pw-{user}@127.0.0.1:{server.port}/0"
