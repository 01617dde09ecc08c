"""The short chaos run (`bench/chaos.py --quick`): the local stack under 1000 events/s survives
kill -9 of each consuming service, a Redis restart, PostgreSQL down 3 s and S3 down 5 s, with no
entity event lost or duplicated, verify clean after every fault and at the end, and exactly one
supervisor restart per kill (no crash loop)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HANG_GUARD_S = 900.0  # a guard against a hung run, not a performance target (that is bench/)
CHAOS = Path(__file__).resolve().parents[3] / "bench" / "chaos.py"
FAULTS = {
    "kill -9 database",
    "kill -9 calculation",
    "kill -9 archival",
    "freeze database 8s",
    "restart redis",
    "stop postgresql 3s",
    "stop s3 5s",
}


def test_quick_chaos_run_loses_nothing_and_verifies_clean(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [
            sys.executable,
            str(CHAOS),
            "--quick",
            "--data-dir",
            str(tmp_path / "stack"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert out.exists(), report
    rows = json.loads(out.read_text())
    by_fault = {row["fault"]: row for row in rows}
    assert set(by_fault) >= FAULTS, report
    for row in rows:
        assert row["lost"] == 0, (row, report)
        assert row["duplicates"] == 0, (row, report)
        assert row["verify_ok"], (row, report)
        assert row["verify"].startswith("OK"), (row, report)
        assert row["restarts_ok"], (row, report)
    for fault in FAULTS:
        assert by_fault[fault]["recovery_s"] is not None, (by_fault[fault], report)
    # the freeze outlasts what the streams hold (3 s of the load): the simulator had to wait
    assert by_fault["freeze database 8s"]["waited_s"] > 1.0, (by_fault, report)
    final = by_fault["final (paused, settled)"]
    assert "archived" in final["verify"] and " 0 archived" not in final["verify"], report
    assert result.returncode == 0, report
