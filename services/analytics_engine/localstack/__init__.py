"""Local infrastructure for `analytics-engine up` and the tests: real Redis, PostgreSQL and
S3 (SeaweedFS) servers run as child processes on free loopback ports."""

from analytics_engine.localstack.ports import free_port, free_port_pairs, free_ports
from analytics_engine.localstack.servers import (
    LocalInfra,
    PostgresServer,
    RedisServer,
    S3Server,
    ServerError,
    ServerNotFoundError,
    ServerStartError,
    SqlError,
)

__all__ = [
    "LocalInfra",
    "PostgresServer",
    "RedisServer",
    "S3Server",
    "ServerError",
    "ServerNotFoundError",
    "ServerStartError",
    "SqlError",
    "free_port",
    "free_port_pairs",
    "free_ports",
]
