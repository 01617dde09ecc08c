"""Session-wide infrastructure for the tests: real Redis, PostgreSQL and S3 servers.

Session fixtures (started on first use, stopped at the end of the session):
  `redis_server`, `postgres_server`, `s3_server`: private servers from
  `analytics_engine.localstack` on free loopback ports, data under pytest's tmp dir.
Per-test fixtures built on them:
  `redis_url`     the Redis URL, with the data flushed before the test (the Redis functions
                  publishing calls stay loaded: `RedisServer` loads them at start)
  `database_url`  a fresh database `test_<uuid>` (dropped after the test)
  `s3_bucket`     a fresh, empty bucket name (bucket created; emptied and deleted after)

To reuse servers that already run instead, set (each on its own):
  AE_TEST_REDIS_URL        e.g. redis://127.0.0.1:6379/0. The server is shared, so tests never
                           FLUSHALL it: they take logical databases 1-15 in turn and FLUSHDB them.
  AE_TEST_DATABASE_URL     a role allowed to CREATE DATABASE; databases are created through it.
  AE_TEST_S3_ENDPOINT_URL  with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
An external server is then a small stand-in with the same connection attributes (no start/stop).
"""

from __future__ import annotations

import itertools
import os
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import boto3
import pytest
import redis
from botocore.config import Config
from hypothesis import settings as hypothesis_settings

from analytics_engine.core.bus.functions import load_library_sync
from analytics_engine.localstack import PostgresServer, RedisServer, S3Server

# CI runs the same examples every time: a red build must be reproducible, not a dice roll.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
# Services started in-process would tune this process's garbage collector (freeze everything
# alive, rarer collections): tests keep Python's defaults.
os.environ.setdefault("SERVICE_GC_THRESHOLD", "0")

if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

# The tests start their own servers: connection settings a shell carries (`set -a; . .run/
# stack.env` of `analytics-engine up`) would point services under test at another stack for
# every setting a fixture leaves unset (DATABASE_READONLY_URL, say).
_STACK_SETTINGS = (
    "REDIS_URL",
    "REDIS_ADMIN_URL",
    "DATABASE_URL",
    "DATABASE_READONLY_URL",
    "S3_ENDPOINT_URL",
    "S3_BUCKET",
    "CALCULATION_URL",
    "GATEWAY_API_KEY",
)
for _name in _STACK_SETTINGS:
    os.environ.pop(_name, None)
if not os.environ.get("AE_TEST_S3_ENDPOINT_URL"):  # else its credentials come from here
    for _name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        os.environ.pop(_name, None)


@dataclass(frozen=True)
class ExternalRedis:
    url: str

    def url_for_db(self, db: int) -> str:
        return urlunsplit(urlsplit(self.url)._replace(path=f"/{db}"))


@dataclass(frozen=True)
class ExternalPostgres:
    admin_dsn: str

    @property
    def dsn(self) -> str:
        return self.admin_dsn

    def dsn_for(self, database: str) -> str:
        return urlunsplit(urlsplit(self.admin_dsn)._replace(path=f"/{database}"))


@dataclass(frozen=True)
class ExternalS3:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}),
        )


@pytest.fixture(scope="session")
def redis_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisServer | ExternalRedis]:
    if url := os.environ.get("AE_TEST_REDIS_URL"):
        yield ExternalRedis(url)
        return
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PostgresServer | ExternalPostgres]:
    if dsn := os.environ.get("AE_TEST_DATABASE_URL"):
        yield ExternalPostgres(dsn)
        return
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server | ExternalS3]:
    if endpoint := os.environ.get("AE_TEST_S3_ENDPOINT_URL"):
        yield ExternalS3(
            endpoint,
            os.environ["AWS_ACCESS_KEY_ID"],
            os.environ["AWS_SECRET_ACCESS_KEY"],
            os.environ.get("AWS_REGION", "us-east-1"),
        )
        return
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def _redis_db_numbers() -> Iterator[int]:
    return itertools.cycle(range(1, 16))


@pytest.fixture
def redis_url(
    redis_server: RedisServer | ExternalRedis, _redis_db_numbers: Iterator[int]
) -> Iterator[str]:
    if isinstance(redis_server, RedisServer):  # private to this session: wipe everything
        url = redis_server.url
        with redis.Redis.from_url(url) as client:
            client.flushall()
    else:
        url = redis_server.url_for_db(next(_redis_db_numbers))
        with redis.Redis.from_url(url) as client:
            client.flushdb()
            load_library_sync(client)  # what services publish with (FLUSHDB keeps functions)
    yield url


@pytest.fixture
async def database_url(
    postgres_server: PostgresServer | ExternalPostgres,
) -> AsyncIterator[str]:
    name = f"test_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_server.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield postgres_server.dsn_for(name)
    try:  # a leftover database only costs disk space: never fail a test for it
        admin = await asyncpg.connect(postgres_server.admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        warnings.warn(f"could not drop test database {name}: {exc!r}", stacklevel=1)


@pytest.fixture
def s3_bucket(s3_server: S3Server | ExternalS3) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:24]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)
