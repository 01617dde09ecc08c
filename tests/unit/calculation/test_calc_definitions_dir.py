"""`KPI_DEFINITIONS_DIR` at the engine's start: one invalid file is reported and skipped, as
the metadata service does with the same directory, instead of stopping the engine (which under
`analytics-engine up` restarted it forever and left every KPI uncomputed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from analytics_engine.calculation.service import Settings, create, directory_definitions

GOOD = """
code: orders_count
display_name: Orders
entity_type: order
aggregation: count
window: {type: tumbling, size: 60s}
"""
BROKEN = """
code: broken
display_name: Broken
entity_type: order
aggregation: sum
window: {type: tumbling, size: 60s}
"""


def write_dir(tmp_path: Path) -> Path:
    (tmp_path / "a-good.yaml").write_text(GOOD)
    (tmp_path / "b-broken.yaml").write_text(BROKEN)
    return tmp_path


def test_an_invalid_file_is_logged_and_the_valid_ones_are_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = write_dir(tmp_path)
    with caplog.at_level(logging.ERROR):
        definitions = directory_definitions(str(directory))
    assert [d.code for d in definitions] == ["orders_count"]
    [record] = [r for r in caplog.records if r.message == "KPI definitions not loaded"]
    assert "b-broken.yaml" in record.error
    assert "required for aggregation 'sum'" in record.error


def test_the_engine_starts_with_an_invalid_file_in_the_directory(tmp_path: Path) -> None:
    settings = Settings(
        KPI_DEFINITIONS_DIR=str(write_dir(tmp_path)), REDIS_URL="redis://127.0.0.1:1/0"
    )
    create(settings)  # raised DefinitionLoadError
