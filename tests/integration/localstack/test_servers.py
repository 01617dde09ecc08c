"""The local servers really run: they answer, keep data across restart() and come back after
kill(). Each test starts its own servers (restarting or killing shared ones would disturb other
tests); the last tests exercise the shared conftest fixtures."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncpg
import boto3
import pytest
import redis
from botocore.exceptions import ClientError
from redis.backoff import NoBackoff
from redis.retry import Retry

from analytics_engine.localstack import (
    LocalInfra,
    PostgresServer,
    RedisServer,
    S3Server,
    ServerStartError,
    free_port,
    free_port_pairs,
    free_ports,
)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(1024 < port < 65536 for port in ports)
    assert not _listening(free_port())
    for base in free_port_pairs(3, 10000):
        assert not _listening(base)
        assert not _listening(base + 10000)


def _anonymous(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))


# -- Redis ---------------------------------------------------------------------------------


def test_redis_answers_keeps_aof_data_and_survives_kill(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        port = server.port
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert port != 6379
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
            client.set("greeting", "hello")
            assert client.get("greeting") == b"hello"
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}

        server.restart()
        assert server.port == port
        with redis.Redis.from_url(server.url) as client:
            assert client.get("greeting") == b"hello"
            client.set("after-restart", "1")
        time.sleep(1.5)  # appendfsync everysec: let the AOF reach the disk before the crash

        server.kill()
        assert not server.running
        assert not _listening(port)
        server.start()
        assert server.port == port
        with redis.Redis.from_url(server.url) as client:
            assert client.get("greeting") == b"hello"
            assert client.get("after-restart") == b"1"
    assert not server.running
    assert (tmp_path / "redis" / "data" / "appendonlydir").is_dir()


def test_redis_password_and_acl_file(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "pw", password="s3cret/pass") as server:
        with (
            _anonymous(server.port) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()

    acl = tmp_path / "users.acl"
    acl.write_text("user default off\nuser calc on >calcpw ~kpi:* +@all\n")
    with RedisServer(tmp_path / "acl", acl_file=acl) as server:
        with (
            _anonymous(server.port) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()
        url = f"redis://calc:calcpw@127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(url) as client:
            client.set("kpi:x", 1)
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.set("other", 1)


def test_start_failure_shows_the_log_tail(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "bad", extra_config={"no-such-directive": "1"})
    with pytest.raises(ServerStartError, match="no-such-directive"):
        server.start()
    assert not server.running


# -- PostgreSQL ----------------------------------------------------------------------------


async def test_postgres_answers_keeps_tables_and_survives_kill(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path / "pg")
    with server:
        port = server.port
        assert server.dsn.endswith(f"@127.0.0.1:{port}/analytics")
        assert port != 5432
        conn = await asyncpg.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            await conn.execute("CREATE TABLE kept (id int PRIMARY KEY, name text)")
            await conn.execute("INSERT INTO kept VALUES (1, 'one')")
        finally:
            await conn.close()

        server.restart()
        assert server.port == port
        conn = await asyncpg.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT name FROM kept WHERE id = 1") == "one"
            await conn.execute("INSERT INTO kept VALUES (2, 'two')")  # committed: durable
        finally:
            await conn.close()

        server.kill()
        assert not _listening(port)
        server.start()
        conn = await asyncpg.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM kept") == 2
        finally:
            await conn.close()
    assert not server.running


async def test_postgres_password_auth_roles_and_sql(tmp_path: Path) -> None:
    with PostgresServer(tmp_path / "pg") as server:
        bad = server.dsn_for("analytics", user=server.superuser, password="wrong")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(bad)

        server.create_role("reader", "it's-secret")
        server.create_role("reader", "it's-secret")  # idempotent
        reader_dsn = server.dsn_for("analytics", user="reader", password="it's-secret")
        conn = await asyncpg.connect(reader_dsn)
        try:
            assert await conn.fetchval("SELECT current_user") == "reader"
        finally:
            await conn.close()

        assert server.execute_sql("SELECT 40 + 2").strip() == "42"
        assert server.execute_sql("SHOW listen_addresses").strip() == "127.0.0.1"
        assert server.execute_sql("SELECT current_database()", database="analytics").strip() == (
            "analytics"
        )


# -- S3 ------------------------------------------------------------------------------------


def test_s3_answers_enforces_credentials_keeps_objects_and_survives_kill(tmp_path: Path) -> None:
    with S3Server(tmp_path / "s3", buckets=["lake"]) as server:
        port = server.port
        client = server.client()
        client.put_object(Bucket="lake", Key="a/b.parquet", Body=b"payload")
        assert client.get_object(Bucket="lake", Key="a/b.parquet")["Body"].read() == b"payload"
        listed = client.list_objects_v2(Bucket="lake", Prefix="a/")
        assert [item["Key"] for item in listed["Contents"]] == ["a/b.parquet"]
        assert "lake" in [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]

        for key, secret in [(server.access_key, "wrong"), ("unknown", server.secret_key)]:
            intruder = boto3.client(
                "s3",
                endpoint_url=server.endpoint_url,
                region_name=server.region,
                aws_access_key_id=key,
                aws_secret_access_key=secret,
            )
            with pytest.raises(ClientError):
                intruder.list_buckets()
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(f"{server.endpoint_url}/lake/a/b.parquet", timeout=5)

        server.restart()
        assert server.port == port
        assert server.client().get_object(Bucket="lake", Key="a/b.parquet")["Body"].read() == (
            b"payload"
        )

        server.kill()
        assert not _listening(port)
        server.start()
        client = server.client()
        assert client.get_object(Bucket="lake", Key="a/b.parquet")["Body"].read() == b"payload"
        client.put_object(Bucket="lake", Key="after-kill", Body=b"x")
        assert client.get_object(Bucket="lake", Key="after-kill")["Body"].read() == b"x"
    assert not server.running


def test_two_s3_servers_side_by_side(tmp_path: Path) -> None:
    with S3Server(tmp_path / "one") as one, S3Server(tmp_path / "two") as two:
        assert not set(one.ports.values()) & set(two.ports.values())
        one.create_bucket("only-in-one")
        names = [bucket["Name"] for bucket in two.client().list_buckets().get("Buckets", [])]
        assert "only-in-one" not in names


# -- all three -----------------------------------------------------------------------------


async def test_local_infra_env(tmp_path: Path) -> None:
    with LocalInfra(tmp_path / "run", bucket="lakehouse") as infra:
        env = infra.env()
        assert set(env) == {
            "REDIS_URL",
            "DATABASE_URL",
            "S3_ENDPOINT_URL",
            "S3_BUCKET",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
        }
        with redis.Redis.from_url(env["REDIS_URL"]) as client:
            assert client.ping()
        conn = await asyncpg.connect(env["DATABASE_URL"])
        try:
            assert await conn.fetchval("SELECT current_database()") == "analytics"
        finally:
            await conn.close()
        infra.s3.client().head_bucket(Bucket=env["S3_BUCKET"])
    assert not any(server.running for server in infra.servers)


# -- the shared conftest fixtures ----------------------------------------------------------


async def test_shared_fixtures(
    redis_url: str, database_url: str, s3_bucket: str, s3_server: S3Server
) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("k", "v")
    conn = await asyncpg.connect(database_url)
    try:
        assert (await conn.fetchval("SELECT current_database()")).startswith("test_")
    finally:
        await conn.close()
    client = s3_server.client()
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"v")


def test_shared_fixtures_are_fresh_per_test(redis_url: str, s3_bucket: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
