"""Runs each service as a child process and restarts it when it dies (the local stack's
stand-in for a Kubernetes Deployment)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from analytics_engine.localstack.process import stop_leftover, write_pid_file

log = logging.getLogger(__name__)


LAST_LINE_MAX: int = 300
"""Most characters of a log's last line `last_line` returns."""


def last_line(path: Path, *, tail_bytes: int = 8192) -> str:
    """The last non-empty line of a log file (at most `LAST_LINE_MAX` characters), or ""."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            tail = f.read()
    except OSError:
        return ""
    lines = [line.strip() for line in tail.decode("utf-8", "replace").splitlines()]
    text = next((line for line in reversed(lines) if line), "")
    return text if len(text) <= LAST_LINE_MAX else text[: LAST_LINE_MAX - 3] + "..."


@dataclass
class ProcessSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path


@dataclass
class _Supervised:
    spec: ProcessSpec
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    """Starts processes, restarts them with backoff when they exit, stops them gracefully.

    A process that ran for more than `stable_after` seconds gets its backoff reset, so a service
    killed once restarts at once while a crash loop slows down.
    """

    def __init__(
        self,
        *,
        pid_dir: Path,
        stop_timeout: float = 20.0,
        stable_after: float = 10.0,
        max_backoff: float = 10.0,
    ) -> None:
        self._pid_dir = pid_dir
        self._stop_timeout = stop_timeout
        self._stable_after = stable_after
        self._max_backoff = max_backoff
        self._children: dict[str, _Supervised] = {}
        self._stopping = False
        self._stop = asyncio.Event()  # wakes restart backoffs at once

    def start(self, spec: ProcessSpec) -> None:
        child = _Supervised(spec)
        self._children[spec.name] = child
        child.task = asyncio.create_task(self._keep_running(child), name=f"supervise:{spec.name}")

    def pid(self, name: str) -> int | None:
        child = self._children.get(name)
        if child is None or child.process is None or child.process.returncode is not None:
            return None
        return child.process.pid

    def restarts(self, name: str) -> int:
        return self._children[name].restarts

    async def _spawn(self, child: _Supervised) -> asyncio.subprocess.Process:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                env={**os.environ, **spec.env},
                stdout=log_file,
                stderr=log_file,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us, and we stop children in order
            )
        write_pid_file(self._pid_dir / f"{spec.name}.pid", process.pid)
        return process

    async def _keep_running(self, child: _Supervised) -> None:
        backoff = 0.5
        while not self._stopping:
            child.process = await self._spawn(child)
            child.started_at = time.monotonic()
            if self._stopping:
                # `stop_all` came while this one was being started: it found no process to
                # stop, so stop it here (cancelled mid-start instead, it would run on, orphaned)
                await self._terminate(child)
                return
            code = await child.process.wait()
            if self._stopping:
                return
            if time.monotonic() - child.started_at > self._stable_after:
                backoff = 0.5
            child.restarts += 1
            # A service that exits by itself says why last (a configuration error is one line
            # naming the variable, exit code 2): show it here, not only in its log. A service
            # killed by a signal (negative code) wrote nothing about it.
            why = last_line(child.spec.log_path) if code > 0 else ""
            log.warning(
                "%s exited with code %s; restarting in %.1fs (restart #%d)%s",
                child.spec.name,
                code,
                backoff,
                child.restarts,
                f": {why}" if why else "",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def stop_all(self, order: Sequence[str] | None = None) -> None:
        """SIGTERM each process (in `order`, default reverse start order) and wait for it.

        A child's task is left to end by itself (it sees `_stopping`), not cancelled: one in the
        middle of starting its process would leave that process running."""
        self._stopping = True
        self._stop.set()
        names = list(order) if order is not None else list(reversed(self._children))
        for name in names:
            child = self._children.get(name)
            if child is None:
                continue
            await self._terminate(child)
            if child.task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(child.task), self._stop_timeout + 5)
                except TimeoutError:
                    child.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await child.task

    async def _terminate(self, child: _Supervised) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self._stop_timeout)
        except TimeoutError:
            log.warning("%s did not stop in time, killing it", child.spec.name)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def stop_leftover_services(pid_dir: Path, *, timeout: float = 20.0) -> list[int]:
    """Stop the services an earlier supervisor, killed before it could stop them, left running
    (their pids in `pid_dir`); returns their pids."""
    pid_files = sorted(pid_dir.glob("*.pid")) if pid_dir.is_dir() else []
    stopped = [stop_leftover(path, path.stem, timeout=timeout) for path in pid_files]
    return [pid for pid in stopped if pid is not None]


def service_argv(service: str) -> list[str]:
    """The command line running one service with this interpreter."""
    return [sys.executable, "-m", "analytics_engine.cli", "run", service]
