"""`stop_leftover`: the process a pid file names is stopped only while it is the very process
that was recorded (a reused pid is left alone)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from analytics_engine.localstack.process import stop_leftover, write_pid_file


def test_a_recorded_process_still_running_is_stopped(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    pid_file = tmp_path / "sleep.pid"
    write_pid_file(pid_file, sleeper.pid)

    assert stop_leftover(pid_file, "sleep", timeout=5) == sleeper.pid
    assert sleeper.wait(5) != 0
    assert not pid_file.exists()


def test_a_reused_pid_or_an_old_pid_file_is_left_alone(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pid_file = tmp_path / "server.pid"
        pid_file.write_text(f"{other.pid} 1\n")  # the recorded process started at another time
        assert stop_leftover(pid_file, "server", timeout=1) is None
        pid_file.write_text(f"{other.pid}\n")  # written by an earlier version: no start time
        assert stop_leftover(pid_file, "server", timeout=1) is None
        assert other.poll() is None
        assert not pid_file.exists()
    finally:
        other.kill()
        other.wait()
