"""py-spy helpers: record a service process while a benchmark step runs, and summarise the
collapsed stacks (`py-spy record --format raw`) as the functions where the time goes."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

PY_SPY_CANDIDATES = ("/tmp/pyspy-venv/bin/py-spy",)


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    for candidate in PY_SPY_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return None


def record(
    pid: int, seconds: float, out: Path, *, rate: int = 50
) -> subprocess.Popen[bytes] | None:
    """Start `py-spy record` on `pid` for `seconds` (collapsed stacks to `out`); None if py-spy
    is not installed."""
    binary = py_spy()
    if binary is None:
        return None
    return subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
    return f"{name} ({file})" if file else name


def summarise(path: Path, top: int = 12) -> str:
    """Self time and inclusive time per function, as shares of all samples."""
    if not path.exists():
        return f"  (no profile at {path})"
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for name in set(frames[1:]):  # frame 0 is the process/thread label
            inclusive[name] += count
    if total == 0:
        return f"  (empty profile at {path})"
    lines = [f"  samples: {total}", "  self time:"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    lines.append("  inclusive time:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top * 2)]
    return "\n".join(lines)
