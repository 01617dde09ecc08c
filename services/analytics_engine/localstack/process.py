"""What every local server shares (`ProcessServer`): a child process on a free loopback port,
`start()` that returns once it answers, graceful `stop()`, `restart()`, `kill()`; and the errors.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from analytics_engine.localstack.ports import LOOPBACK

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
POLL_INTERVAL = 0.1
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


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, *, offset: int = 0) -> str:
    """The last `lines` lines of the file at `path` from byte `offset` on ('' if missing)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class Started(abc.ABC):
    """`with x:` starts `x` and stops it on the way out."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

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


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), None if it is gone or a zombie:
    with the pid it names one process, even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def write_pid_file(path: Path, pid: int) -> None:
    """Record process `pid` in `path` (with its start time) for `stop_leftover`."""
    write_private(path, f"{pid} {_start_time(pid) or ''}\n")


def stop_leftover(
    pid_file: Path, name: str, *, stop_signal: int = signal.SIGTERM, timeout: float = 20.0
) -> int | None:
    """Stop the process `pid_file` names if it still runs, left by an earlier run that was
    killed before it could stop its children: `stop_signal`, then SIGKILL of its process group
    after `timeout` seconds. Returns its pid, None when nothing was running."""
    try:
        pid_text, started = pid_file.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return None
    if _start_time(pid) != started:  # gone (or the pid now names another process)
        pid_file.unlink(missing_ok=True)
        return None
    logger.warning("%s: stopping pid %d, left running by an earlier run", name, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, stop_signal)
    deadline = time.monotonic() + timeout
    while _start_time(pid) == started and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # it leads its own group: whatever is left of it
    while _start_time(pid) == started and time.monotonic() < deadline + 5:
        time.sleep(POLL_INTERVAL)
    pid_file.unlink(missing_ok=True)
    return pid


class ProcessServer(Started):
    """A server run as one child process in its own process group, its pid in
    `base_dir/<name>.pid` while it runs: `start()` first stops a server an earlier run left
    running on the same data (killed before it could stop it)."""

    name: ClassVar[str] = "server"
    stop_signal: ClassVar[int] = signal.SIGTERM
    """What stops the server gracefully when it is not our child (a leftover)."""

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
        self.pid_path: Path = self.base_dir / f"{self.name}.pid"
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
        self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        stop_leftover(
            self.pid_path, self.name, stop_signal=self.stop_signal, timeout=self.stop_timeout
        )
        retry_on_port_clash = not self._ports_fixed and not self._started_once
        try:
            self._start_once()
        except PortClashError:
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
        write_pid_file(self.pid_path, proc.pid)
        logger.debug("%s: started pid %d: %s", self.name, proc.pid, command[0])
        deadline = started + self.startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                self.pid_path.unlink(missing_ok=True)
                self._fail(f"exited with code {code} before answering", offset)
            try:
                if self._probe():
                    break
            except Exception as exc:  # not answering yet
                logger.debug("%s: not ready yet: %s", self.name, exc)
            if time.monotonic() > deadline:
                self._kill_group(proc)
                self._fail(f"did not answer within {self.startup_timeout:.0f}s", offset)
            time.sleep(POLL_INTERVAL)
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
            raise PortClashError(f"{self.name}: {reason}; port in use\n{tail}")
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

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.pid_path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state} {self.base_dir}>"


class PortClashError(ServerStartError):
    """The server could not bind its port: another process took it."""


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` (its directory made if missing), readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    path.chmod(0o600)


def socket_dir_or_none(directory: Path) -> Path | None:
    return directory if len(str(directory)) <= _MAX_SOCKET_DIR_LEN else None


# =========================================================================================
# Redis
# =========================================================================================
