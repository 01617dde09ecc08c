"""Operator settings from environment variables (pydantic-settings).

`METADATA_URL` and `OPERATOR_PORT` are part of the product interface (docs/architecture.md);
the other `OPERATOR_*` variables tune the operator. Everything the operator does is driven by
one frozen instance of `KpiOperatorSettings`, so tests build it explicitly instead of patching
the environment.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class KpiOperatorSettings(BaseSettings):
    """Settings of the KPIDefinition operator (`analytics-engine run operator`)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO",
        validation_alias="LOG_LEVEL",
        description="Least severe level logged (JSON logs on stderr under "
        "`analytics-engine run operator`).",
    )
    metadata_url: str = Field(
        default="http://localhost:8083",
        validation_alias="METADATA_URL",
        pattern=r"^https?://",
        description="Base URL of the metadata service's HTTP API.",
    )
    request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        validation_alias="OPERATOR_REQUEST_TIMEOUT",
        description="Total timeout of one metadata-service request; a timeout counts as "
        "'metadata unavailable' (retried), never as 'invalid'.",
    )
    resync_interval_s: float = Field(
        default=300.0,
        gt=0,
        validation_alias="OPERATOR_RESYNC_INTERVAL",
        description="How often every KPIDefinition is re-asserted into the metadata service, so "
        "drift (e.g. metadata's database restored from a backup) heals without a CR change.",
    )
    retry_backoff_s: float = Field(
        default=5.0,
        gt=0,
        validation_alias="OPERATOR_RETRY_BACKOFF",
        description="First retry delay while the metadata service is unavailable; doubles per "
        "attempt up to OPERATOR_RETRY_BACKOFF_MAX.",
    )
    retry_backoff_max_s: float = Field(
        default=300.0,
        gt=0,
        validation_alias="OPERATOR_RETRY_BACKOFF_MAX",
        description="Longest retry delay while the metadata service is unavailable (the cap "
        "of `OPERATOR_RETRY_BACKOFF`'s doubling).",
    )
    port: int = Field(
        default=8087,
        ge=1,
        le=65535,
        validation_alias="OPERATOR_PORT",
        description="Port of the liveness endpoint `GET /healthz`.",
    )
    liveness_host: str = Field(
        default="0.0.0.0",
        validation_alias="OPERATOR_LIVENESS_HOST",
        description="Interface the liveness endpoint binds to.",
    )
    namespaces: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        validation_alias="OPERATOR_NAMESPACES",
        description="Comma-separated namespaces (kopf patterns allowed) to serve; empty means "
        "all namespaces (cluster-wide).",
    )
    peering_name: str | None = Field(
        default=None,
        validation_alias="OPERATOR_PEERING_NAME",
        description="kopf peering object for running several replicas (needs kopf's peering "
        "CRDs and RBAC); unset means standalone, which is correct for the single replica the "
        "chart deploys.",
    )
    watch_server_timeout_s: float = Field(
        default=300.0,
        gt=0,
        validation_alias="OPERATOR_WATCH_TIMEOUT",
        description="Server-side timeout of each Kubernetes watch request; the watch is then "
        "re-established. Bounded so a silently dead connection cannot stall the operator.",
    )

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split_namespaces(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def backoff_for(self, retry: int) -> float:
        """Delay before retry number `retry` (0-based): exponential, capped."""
        return float(min(self.retry_backoff_s * (2 ** min(retry, 30)), self.retry_backoff_max_s))


class ReleaseSettings(BaseSettings):
    """Settings of `python -m analytics_engine_operator.release` (the chart's pre-delete hook).

    The selector is required and must not be empty: an empty selector would delete every
    KPIDefinition of the namespace, including those of other releases or teams.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", validation_alias="LOG_LEVEL", description="Least severe level logged."
    )
    namespace: str = Field(
        validation_alias="KPI_RELEASE_NAMESPACE",
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="Namespace whose KPIDefinitions are released.",
    )
    label_selector: str = Field(
        validation_alias="KPI_RELEASE_SELECTOR",
        min_length=1,
        pattern=r"\S",
        description="Kubernetes label selector of the KPIDefinitions to release, e.g. "
        "`app.kubernetes.io/instance=ae,app.kubernetes.io/component=samples`.",
    )
    timeout_s: float = Field(
        default=120.0,
        gt=0,
        validation_alias="KPI_RELEASE_TIMEOUT",
        description="How long the operator gets to delete the KPIs and release its finalizer; "
        "after it the finalizer is removed without the operator (the KPIs may then remain in "
        "the metadata database). Also how long an unreachable API server is retried.",
    )
    poll_interval_s: float = Field(
        default=2.0,
        gt=0,
        validation_alias="KPI_RELEASE_POLL_INTERVAL",
        description="Delay between two looks at what is left.",
    )
    request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        validation_alias="KPI_RELEASE_REQUEST_TIMEOUT",
        description="Total timeout of one Kubernetes API request.",
    )
