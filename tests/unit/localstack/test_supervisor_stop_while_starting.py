"""A stop that comes while the supervisor is starting a service's process (a restart after a
crash, when Ctrl-C arrives) stops that process too: cancelled mid-start, it ran on, orphaned,
holding its port, and the next `up` had to clean it up."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from analytics_engine.localstack.supervisor import ProcessSpec, Supervisor, _Supervised


class SlowToStart(Supervisor):
    """Its process exists a moment before the supervisor knows it (as while
    `create_subprocess_exec` finishes setting it up)."""

    def __init__(self, pid_dir: Path) -> None:
        super().__init__(pid_dir=pid_dir, stop_timeout=5)
        self.spawned: list[int] = []
        self.starting = asyncio.Event()

    async def _spawn(self, child: _Supervised) -> asyncio.subprocess.Process:
        process = await super()._spawn(child)
        self.spawned.append(process.pid)
        self.starting.set()
        await asyncio.sleep(0.5)
        return process


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: reaped by asyncio's child watcher or not, it runs nothing
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][:1] != "Z"


@pytest.mark.asyncio
async def test_a_process_started_while_stopping_is_stopped_too(tmp_path: Path) -> None:
    supervisor = SlowToStart(tmp_path / "pids")
    spec = ProcessSpec(
        "gateway",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        {},
        tmp_path / "gateway.log",
    )
    supervisor.start(spec)
    async with asyncio.timeout(20):
        await supervisor.starting.wait()
        await supervisor.stop_all()
    [pid] = supervisor.spawned
    assert not alive(pid)
