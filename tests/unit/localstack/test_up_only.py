"""`analytics-engine up --only` refuses an unknown service before it starts any server."""

from __future__ import annotations

from pathlib import Path

import pytest

from analytics_engine.cli import main


def test_a_typo_in_only_fails_before_any_server_starts(tmp_path: Path) -> None:
    data_dir = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"unknown service.*: gatway"):
        main(["up", "--only", "gateway,gatway", "--data-dir", str(data_dir)])
    assert not data_dir.exists()  # nothing was set up, let alone Redis, PostgreSQL or S3
