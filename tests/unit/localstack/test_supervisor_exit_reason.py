"""The supervisor says why a service exited: its log's last line, on the terminal `up` runs
in (a configuration error restarts forever, and the log was the only place that named it)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from analytics_engine.localstack.supervisor import (
    LAST_LINE_MAX,
    ProcessSpec,
    Supervisor,
    last_line,
)

CONFIG_ERROR = "configuration error: GATEWAY_API_KEYS: pair 1: keys need at least 16 characters"


class Warnings(logging.Handler):
    """Collects the supervisor's messages; `exited` is set at the first exit it reports."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.exited = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if "exited with code" in record.getMessage():
            self.exited.set()


async def exits(code: str, tmp_path: Path) -> str:
    """The supervisor's first warning about a child that prints CONFIG_ERROR to stderr (its
    log) and then ends with `code` (Python: `sys.exit(2)`, a kill)."""
    script = f"import os, sys; print({CONFIG_ERROR!r}, file=sys.stderr, flush=True); {code}"
    supervisor = Supervisor(pid_dir=tmp_path / "pids")
    spec = ProcessSpec("gateway", [sys.executable, "-c", script], {}, tmp_path / "gateway.log")
    logger = logging.getLogger("analytics_engine.localstack.supervisor")
    handler = Warnings()
    logger.addHandler(handler)
    try:
        supervisor.start(spec)
        async with asyncio.timeout(20):
            await handler.exited.wait()
    finally:
        await supervisor.stop_all()
        logger.removeHandler(handler)
    return next(m for m in handler.messages if "exited with code" in m)


@pytest.mark.asyncio
async def test_a_service_that_exits_by_itself_has_its_last_log_line_shown(tmp_path: Path) -> None:
    message = await exits("sys.exit(2)", tmp_path)
    assert message.startswith("gateway exited with code 2; restarting in 0.5s (restart #1)")
    assert message.endswith(f": {CONFIG_ERROR}")


@pytest.mark.asyncio
async def test_a_service_killed_by_a_signal_has_no_log_line_shown(tmp_path: Path) -> None:
    """Its last line predates the kill and says nothing about it."""
    message = await exits("os.kill(os.getpid(), 9)", tmp_path)
    assert message == "gateway exited with code -9; restarting in 0.5s (restart #1)"


def test_last_line_skips_blank_lines_and_is_bounded(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    assert last_line(log) == ""  # no log yet
    log.write_text("first\n" + "x" * 10_000 + "\nlast one\n\n  \n")
    assert last_line(log) == "last one"
    log.write_text("y" * 1000 + "\n")
    assert last_line(log) == "y" * (LAST_LINE_MAX - 3) + "..."
