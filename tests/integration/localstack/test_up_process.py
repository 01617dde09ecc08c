"""`analytics-engine up` as a user runs it (a process of its own, `--only metadata` to keep it
light): one `up` per data directory, stop signals, leftovers of a killed `up`, private data."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_LINE = "Press Ctrl-C to stop."
UP = [sys.executable, "-m", "analytics_engine.cli", "up"]


class Up:
    """One `analytics-engine up --only metadata` child process, its output read line by line."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process = subprocess.Popen(
            [*UP, "--data-dir", str(data_dir), "--only", "metadata"],
            cwd=data_dir.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} in:\n" + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"up exited before {text!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)

    def exit_code(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout)
        self.wait_for_end()
        return code

    def wait_for_end(self) -> None:
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)

    def output(self) -> str:
        return "\n".join(self.lines)


def _processes_under(directory: Path) -> set[int]:
    """Processes (but this one) whose working directory or command line is below
    `directory`: every server and service of an `up` run from there."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(directory)) or str(directory) in cmdline:
            found.add(int(entry.name))
    return found


def _wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    """The processes of `pids` still running after `timeout` seconds (zombies are gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {pid for pid in pids if _state(pid) not in ("Z", None)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The directory `up` runs in; whatever a test leaves running there is killed after it."""
    yield tmp_path
    for pid in _processes_under(tmp_path):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def test_a_second_up_on_the_same_data_dir_is_refused(workdir: Path) -> None:
    data_dir = workdir / "run"
    first = Up(data_dir)
    first.wait_for(READY_LINE)
    settings = (data_dir / "stack.env").read_text()
    running = _processes_under(workdir)

    second = subprocess.run(
        [*UP, "--data-dir", str(data_dir)],
        check=False,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert second.returncode != 0
    message = (second.stdout + second.stderr).strip()
    assert len(message.splitlines()) == 1, message
    assert "already running" in message
    assert str(first.process.pid) in message
    assert (data_dir / "stack.env").read_text() == settings  # the first's credentials hold
    assert _processes_under(workdir) == running  # no server started, none stopped
    first.process.send_signal(signal.SIGINT)
    assert first.exit_code() == 0
    assert _wait_gone(running) == set()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_everything(workdir: Path, signum: signal.Signals) -> None:
    up = Up(workdir / "run")
    up.wait_for(READY_LINE)
    running = _processes_under(workdir)
    assert len(running) >= 4  # redis, postgres, weed, the service

    up.process.send_signal(signum)

    assert up.exit_code() == 0
    assert "stopping servers..." in up.output()
    assert _wait_gone(running) == set()


def test_a_stop_signal_while_the_servers_start_leaves_nothing_running(workdir: Path) -> None:
    up = Up(workdir / "run")
    up.wait_for("starting Redis, PostgreSQL and S3")
    time.sleep(0.3)  # some servers are starting, some not yet
    up.process.send_signal(signal.SIGTERM)
    up.exit_code()
    assert _wait_gone(_processes_under(workdir), timeout=5) == set()


def test_repeated_ctrl_c_while_stopping_leaves_nothing_running(workdir: Path) -> None:
    up = Up(workdir / "run")
    up.wait_for(READY_LINE)
    running = _processes_under(workdir)

    up.process.send_signal(signal.SIGINT)
    up.wait_for("stopping services...")
    up.process.send_signal(signal.SIGINT)
    up.wait_for("stopping servers...")
    for _ in range(3):
        up.process.send_signal(signal.SIGINT)
        time.sleep(0.05)

    up.exit_code()
    assert _wait_gone(running) == set()


def test_up_stops_what_a_killed_up_left_running(workdir: Path) -> None:
    data_dir = workdir / "run"
    killed = Up(data_dir)
    killed.wait_for(READY_LINE)
    killed.process.kill()
    killed.exit_code()
    left = _processes_under(workdir)
    assert len(left) >= 4  # redis, postgres, weed, the service: all still running

    again = Up(data_dir)
    again.wait_for(READY_LINE)

    assert _wait_gone(left, timeout=0) == set(), again.output()
    named = {pid for pid in left if f"pid {pid}," in again.output()}
    assert len(named) == 4, again.output()  # each server's and the service's main process
    again.process.send_signal(signal.SIGINT)
    assert again.exit_code() == 0
    assert _wait_gone(_processes_under(workdir)) == set()


def test_the_data_dir_is_private(workdir: Path) -> None:
    data_dir = workdir / "run"
    data_dir.mkdir(mode=0o755)  # as an earlier version created it
    data_dir.chmod(0o755)
    (data_dir / "stack.env").touch(mode=0o600)
    up = Up(data_dir)
    up.wait_for(READY_LINE)

    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for server in ("redis", "postgres", "s3"):
        # as root without CAP_DAC_READ_SEARCH `up` adds o+x for PostgreSQL's user (traverse)
        assert stat.S_IMODE((data_dir / server).stat().st_mode) & 0o076 == 0, server
    for path in data_dir.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    up.process.send_signal(signal.SIGINT)
    assert up.exit_code() == 0


def test_a_data_dir_that_is_no_earlier_ups_keeps_its_mode(workdir: Path) -> None:
    """`--data-dir` naming a shared directory (/tmp, a home directory) must not lock others
    out of it: only the servers' directories in it are made owner-only."""
    data_dir = workdir / "shared"
    data_dir.mkdir()
    data_dir.chmod(0o1777)
    up = Up(data_dir)
    up.wait_for(READY_LINE)

    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o1777
    for server in ("redis", "postgres", "s3"):
        assert stat.S_IMODE((data_dir / server).stat().st_mode) & 0o076 == 0, server
    up.process.send_signal(signal.SIGINT)
    assert up.exit_code() == 0
