"""`LocalInfra`: the three servers together, for `analytics-engine up` and the benches."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from analytics_engine.localstack.postgres_server import PostgresServer
from analytics_engine.localstack.process import ProcessServer, Started
from analytics_engine.localstack.redis_server import RedisServer
from analytics_engine.localstack.s3_server import S3Server

logger = logging.getLogger(__name__)


class LocalInfra(Started):
    """Redis, PostgreSQL and S3 under one base directory (`redis/`, `postgres/`, `s3/`)."""

    def __init__(
        self,
        base_dir: Path | str,
        *,
        bucket: str = "analytics-lakehouse",
        region: str = "us-east-1",
        redis_password: str | None = None,
        redis_acl_file: Path | None = None,
        redis_admin_password: str | None = None,
    ) -> None:
        self.base_dir: Path = Path(base_dir).absolute()
        self.bucket: str = bucket
        self.redis: RedisServer = RedisServer(
            self.base_dir / "redis",
            password=redis_password,
            acl_file=redis_acl_file,
            admin_password=redis_admin_password,
        )
        self.postgres: PostgresServer = PostgresServer(self.base_dir / "postgres")
        self.s3: S3Server = S3Server(self.base_dir / "s3", region=region, buckets=[bucket])

    @property
    def servers(self) -> tuple[RedisServer, PostgresServer, S3Server]:
        return (self.redis, self.postgres, self.s3)

    def start(self) -> None:
        """Start the three servers in parallel; on any failure stop those that started."""
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="localstack") as pool:
            futures = [pool.submit(server.start) for server in self.servers]
        errors = [exc for future in futures if (exc := future.exception()) is not None]
        if errors:
            self.stop()
            raise errors[0]

    def stop(self) -> None:
        """Stop the three servers (in parallel)."""
        self._each(lambda server: server.stop())

    def _each(self, action: Callable[[ProcessServer], None]) -> None:
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="localstack") as pool:
            futures = [pool.submit(action, server) for server in self.servers]
        for future in futures:
            if (exc := future.exception()) is not None:
                logger.error("localstack: %s", exc)

    def env(self) -> dict[str, str]:
        """Connection settings for the services, by their environment variable names."""
        return {
            "REDIS_URL": self.redis.url,
            "DATABASE_URL": self.postgres.dsn,
            "S3_ENDPOINT_URL": self.s3.endpoint_url,
            "S3_BUCKET": self.bucket,
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_REGION": self.s3.region,
        }
