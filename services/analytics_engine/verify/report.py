"""Rendering of a verify run: a text table or JSON (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from analytics_engine.verify.compare import KpiSummary, Mismatch


@dataclass(slots=True)
class Report:
    start: datetime | None = None
    end: datetime | None = None
    definitions_source: str = ""
    kpis: list[KpiSummary] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    lake: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "range": {
                "start": self.start.isoformat() if self.start else None,
                "end": self.end.isoformat() if self.end else None,
            },
            "definitions": self.definitions_source,
            "summary": {
                "kpis": [
                    {
                        "kpi_code": k.kpi_code,
                        "compared": k.compared,
                        "matched": k.matched,
                        "mismatches": k.mismatches,
                        "open_windows_skipped": k.open_windows_skipped,
                        "other_version_skipped": k.other_version_skipped,
                        "before_version_skipped": k.before_version_skipped,
                        "pending_backfill": k.pending_backfill,
                    }
                    for k in self.kpis
                ],
                "lake": self.lake,
                "mismatches": len(self.mismatches),
            },
            "notes": self.notes,
            "mismatches": [m.to_dict() for m in self.mismatches],
        }


def _fmt_value(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.12g}"
    return str(value)


def _fmt_window(m: Mismatch) -> str:
    if m.window_start is None or m.window_end is None:
        return "-"
    return f"{m.window_start.isoformat()} .. {m.window_end.isoformat()}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return out


def render_text(report: Report, *, limit: int = 200) -> str:
    lines: list[str] = []
    if report.mismatches:
        rows = [
            [
                m.kpi_code,
                _fmt_window(m),
                m.dims or "-",
                _fmt_value(m.expected),
                _fmt_value(m.stored),
                m.problem + (f" ({m.detail})" if m.detail else ""),
            ]
            for m in report.mismatches[:limit]
        ]
        lines += _table(["kpi_code", "window", "dimensions", "expected", "stored", "problem"], rows)
        if len(report.mismatches) > limit:
            lines.append(f"... and {len(report.mismatches) - limit} more (use --json)")
        lines.append("")
    span = (
        f"{report.start.isoformat() if report.start else 'auto'} .. "
        f"{report.end.isoformat() if report.end else 'auto'}"
    )
    lines.append(f"range: {span}; definitions from {report.definitions_source}")
    summary_rows = [
        [
            k.kpi_code,
            str(k.compared),
            str(k.matched),
            str(k.mismatches),
            str(k.open_windows_skipped),
            str(k.other_version_skipped),
            str(k.before_version_skipped),
            str(k.pending_backfill),
        ]
        for k in report.kpis
    ]
    lines += _table(
        [
            "kpi_code",
            "compared",
            "matched",
            "mismatches",
            "open_skipped",
            "other_version",
            "before_version",
            "pending_backfill",
        ],
        summary_rows,
    )
    if report.lake:
        lines.append("lake: " + ", ".join(f"{k}={v}" for k, v in report.lake.items()))
    lines.extend(f"note: {n}" for n in report.notes)
    verdict = "OK" if report.ok else f"FAILED: {len(report.mismatches)} mismatch(es)"
    lines.append(verdict)
    return "\n".join(lines)


def render_json(report: Report) -> str:
    return orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode()
