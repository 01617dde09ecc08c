from __future__ import annotations

from pathlib import Path

import pytest

from analytics_engine.kpi.loader import (
    DefinitionLoadError,
    load_definitions_dir,
    load_definitions_file,
)

ONE = """
code: orders_count
display_name: Orders
entity_type: order
aggregation: count
window: {type: tumbling, size: 60s}
"""
LIST = """
- code: revenue
  display_name: Revenue
  entity_type: order
  aggregation: sum
  field: amount
  window: {type: tumbling, size: 1m, allowed_lateness: 10s}
- code: open_orders
  display_name: Open
  entity_type: order
  query: {sql: "SELECT 1", schedule: 30s}
"""
CRD = """
apiVersion: analytics.example.com/v1
kind: KPIDefinition
metadata: {name: avg_basket}
spec:
  display_name: Basket
  entity_type: order
  aggregation: avg
  field: amount
  window: {type: sliding, size: 60s, slide: 20s}
---
apiVersion: analytics.example.com/v1
kind: KPIDefinition
metadata: {name: ignored-name}
spec:
  code: max_amount
  display_name: Max
  entity_type: order
  aggregation: max
  field: amount
  window: {type: tumbling, size: 30s}
"""


def test_loads_single_list_and_custom_resources(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(ONE)
    (tmp_path / "b.yml").write_text(LIST)
    (tmp_path / "c.yaml").write_text(CRD)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "empty.yaml").write_text("")
    codes = [d.code for d in load_definitions_dir(tmp_path)]
    assert codes == ["orders_count", "revenue", "open_orders", "avg_basket", "max_amount"]


def test_errors_name_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(ONE.replace("60s", "60 seconds"))
    (tmp_path / "b.yaml").write_text(LIST.replace("  field: amount\n", ""))
    (tmp_path / "c.yaml").write_text("code: [unclosed")
    (tmp_path / "d.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nspec: {}\n")
    with pytest.raises(DefinitionLoadError) as info:
        load_definitions_dir(tmp_path)
    text = str(info.value)
    assert f"{tmp_path / 'a.yaml'}: window.size: invalid duration" in text
    assert f"{tmp_path / 'b.yaml'}: [0].field: required for aggregation 'sum'" in text
    assert f"{tmp_path / 'c.yaml'}: <document>: invalid YAML" in text
    assert f"{tmp_path / 'd.yaml'}: kind: expected kind 'KPIDefinition'" in text
    assert len(info.value.errors) == 4


def test_duplicate_codes_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(ONE)
    (tmp_path / "b.yaml").write_text(ONE)
    with pytest.raises(DefinitionLoadError, match="already defined in"):
        load_definitions_dir(tmp_path)


def test_multi_document_locations(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(
        CRD.replace("field: amount\n  window: {type: sliding", "window: {type: sliding")
    )
    with pytest.raises(DefinitionLoadError, match=r"document 1\.field: required"):
        load_definitions_file(path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DefinitionLoadError, match="not a directory"):
        load_definitions_dir(tmp_path / "nope")
