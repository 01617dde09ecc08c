"""Real Redis, PostgreSQL and S3 (SeaweedFS) servers, run as child processes, one module each
(sharing `process`).

Used by `analytics-engine up` and by the test fixtures. Every server binds 127.0.0.1 on a free
port, keeps its data under the base directory it is given, and `start()` returns only once the
server really answers (or raises `ServerStartError` with the tail of the server's log). Servers
already running on the standard ports (6379, 5432, 8333) are never used.

    with LocalInfra(Path(".run")) as infra:
        env = infra.env()      # REDIS_URL, DATABASE_URL, S3_ENDPOINT_URL, ...

Every server has `start()`, `stop()` (graceful, then SIGKILL), `restart()` (same port, same
data), `kill()` (SIGKILL of the whole process group, for chaos tests) and context-manager
support. The classes are synchronous and not thread-safe.
"""

from analytics_engine.localstack.infra import LocalInfra
from analytics_engine.localstack.ports import free_port, free_port_pairs, free_ports
from analytics_engine.localstack.postgres_server import PostgresServer
from analytics_engine.localstack.process import (
    ServerError,
    ServerNotFoundError,
    ServerStartError,
    SqlError,
)
from analytics_engine.localstack.redis_server import RedisServer
from analytics_engine.localstack.s3_server import S3Server

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
