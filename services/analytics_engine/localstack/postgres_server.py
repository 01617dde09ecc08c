"""PostgreSQL as a child process (`PostgresServer`), run as an unprivileged user when root."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from analytics_engine.localstack.ports import free_ports
from analytics_engine.localstack.process import (
    LOG_TAIL_LINES,
    ProcessServer,
    ServerNotFoundError,
    ServerStartError,
    SqlError,
    socket_dir_or_none,
    write_private,
)

logger = logging.getLogger(__name__)


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


class PostgresServer(ProcessServer):
    """A private PostgreSQL cluster (initdb on first start) listening on 127.0.0.1 only.

    TCP connections need the superuser's password (scram-sha-256); it is generated on first
    start and kept in `base_dir/superuser.password` so a later run on the same data works.
    When running as root, initdb and postgres run as the unprivileged system user `os_user`
    (created if missing) and the ancestors of `base_dir` get o+x so that user can reach the
    data. The unix socket lives in the data directory (disabled if that path is too long).
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown (SIGTERM waits for every client to leave)

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
            write_private(self.password_file, self.password + "\n")
        if account is not None and not _has_capability(_CAP_DAC_READ_SEARCH):
            _make_traversable(self.base_dir)
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.data_dir.exists():  # leftover of an interrupted initdb
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(mode=0o700)
        pwfile = self.base_dir / ".initdb-password"
        write_private(pwfile, self.password + "\n")
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
            output = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise ServerStartError(f"initdb failed (exit {result.returncode}):\n{output}")
        logger.info("postgres: initialized cluster in %s", self.data_dir)

    def _command(self) -> list[str]:
        socket_dir = socket_dir_or_none(self.data_dir)
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
