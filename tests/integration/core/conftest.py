"""A Redis started with the platform's ACL file: every service user, each with its own password."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from analytics_engine.core.acl import SERVICE_ACCESS, acl_file
from analytics_engine.localstack import RedisServer


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    base = tmp_path_factory.mktemp("acl-redis")
    path = base / "users.acl"
    path.write_text(acl_file({s: f"pw-{s}" for s in SERVICE_ACCESS}, admin_password="admin-pw"))
    with RedisServer(base / "redis", acl_file=Path(path), admin_password="admin-pw") as server:
        yield server
