"""Settings from environment variables (pydantic-settings), grouped by concern.

The variable names (`REDIS_URL`, `DATABASE_URL`, `S3_*`, `AWS_*`, ...) are the product's
interface; each service composes the groups it needs into its own settings class.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Literal, TypeVar

from pydantic import AliasChoices, Field, PostgresDsn, RedisDsn, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class BaseServiceSettings(BaseSettings):
    """What every service needs: the bus, its identity, logging and bus tuning."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    redis_url: RedisDsn = Field(
        default=RedisDsn("redis://localhost:6379"),
        validation_alias="REDIS_URL",
        repr=False,  # holds the password
        description="Redis for pub/sub, streams and request/reply (spec default).",
    )
    instance_id: str = Field(
        default_factory=default_instance_id,
        validation_alias="SERVICE_INSTANCE_ID",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="Instance id in `reply.{service}.{instance}` and stream consumer names; "
        "by default `{hostname}-{pid}`.",
    )
    http_host: str = Field(
        default="0.0.0.0",
        validation_alias="SERVICE_HOST",
        min_length=1,
        description="Address the service's HTTP server listens on. Every address in a pod (its "
        "Service and NetworkPolicy decide who reaches it); the local stack keeps the business "
        "services, whose HTTP APIs have no authentication of their own, on 127.0.0.1.",
    )
    log_level: LogLevel = Field(
        default="INFO", validation_alias="LOG_LEVEL", description="JSON logs on stderr."
    )
    stream_maxlen: int = Field(
        default=1_000_000,
        ge=1000,
        validation_alias="BUS_STREAM_MAXLEN",
        description="Entries a durable event stream holds at most (approximately), so Redis "
        "memory is bounded. A publisher whose stream is full waits until the stream's readers "
        "catch up (backpressure) rather than drop entries they have not read: at the default, "
        "a reader may be down ~50 s at 20k events/s before its publishers wait. Keep it well "
        "above events/s x `OBSERVABILITY_TRIM_INTERVAL` (what a stream gains between trims).",
    )
    consumer_batch_size: int = Field(
        default=500,
        ge=1,
        le=10_000,
        validation_alias="BUS_BATCH_SIZE",
        description="Events read from a stream per batch.",
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        validation_alias="BUS_MAX_DELIVERIES",
        description="Deliveries of an event before it is dead-lettered.",
    )
    claim_idle_ms: int = Field(
        default=30_000,
        ge=100,
        validation_alias="BUS_CLAIM_IDLE_MS",
        description="Pending events idle this long (their consumer died) are claimed by a peer.",
    )
    request_concurrency: int = Field(
        default=64,
        ge=1,
        validation_alias="BUS_REQUEST_CONCURRENCY",
        description="Requests a responder executes at once; more wait (or go to a replica).",
    )
    request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        validation_alias="BUS_REQUEST_TIMEOUT",
        description="Default request/reply timeout, seconds.",
    )
    heartbeat_interval_s: float = Field(
        default=5.0,
        gt=0,
        validation_alias="HEARTBEAT_INTERVAL",
        description="Seconds between heartbeats on `observability.heartbeat`.",
    )
    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0,
        le=600,
        validation_alias="SERVICE_SHUTDOWN_GRACE",
        description="On stop, seconds HTTP requests in flight get to finish (after the bus "
        "work in hand) before they are cancelled and the service's resources are closed.",
    )
    gc_threshold: int = Field(
        default=50_000,
        ge=0,
        validation_alias="SERVICE_GC_THRESHOLD",
        description="Allocations between collections of Python's cyclic GC (generation 0); "
        "objects built at startup are frozen out of collections. 0: Python's defaults.",
    )


class DatabaseSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    database_url: PostgresDsn = Field(
        validation_alias="DATABASE_URL",
        repr=False,  # holds the password
        description="PostgreSQL URL (`postgresql://user:password@host:5432/db`); the service "
        "applies its schema migrations through it at start.",
    )


class S3Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    s3_endpoint_url: str = Field(
        validation_alias="S3_ENDPOINT_URL",
        pattern=r"^https?://",
        description="URL of the S3-compatible object store the lake is written to (path-style "
        "addressing, as MinIO and SeaweedFS need).",
    )
    s3_bucket: str = Field(
        default="analytics-lakehouse",
        validation_alias="S3_BUCKET",
        pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$",
        description="Bucket of the lake; created at first use when it does not exist.",
    )
    aws_access_key_id: str | None = Field(
        default=None,
        validation_alias="AWS_ACCESS_KEY_ID",
        description="Access key id for S3. Unset: boto3 looks for credentials itself (its "
        "shared credentials file, an instance or pod role).",
    )
    aws_secret_access_key: str | None = Field(
        default=None,
        validation_alias="AWS_SECRET_ACCESS_KEY",
        repr=False,
        description="Secret access key for S3, with `AWS_ACCESS_KEY_ID`.",
    )
    aws_region: str = Field(
        default="us-east-1",
        validation_alias="AWS_REGION",
        description="Region S3 requests are signed for; on AWS, the bucket's region.",
    )


S = TypeVar("S", bound=BaseSettings)


class ConfigurationError(SystemExit):
    """Raised when the environment does not configure a service; the message names the variable."""


def _variable_name(settings_cls: type[BaseSettings], loc: tuple[int | str, ...]) -> str:
    name = str(loc[0]) if loc else "?"
    field = settings_cls.model_fields.get(name)
    alias = field.validation_alias if field is not None else None
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return name.upper()


def load_settings(settings_cls: type[S]) -> S:
    """Load settings, turning a validation failure into one clear line per bad variable.

    Secret values are never echoed: the message names the variable and the rule it broke.
    """
    try:
        return settings_cls()
    except ValidationError as exc:
        problems = "; ".join(
            f"{_variable_name(settings_cls, err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        print(f"configuration error: {problems}", file=sys.stderr)
        raise ConfigurationError(2) from None
