"""Query the lake with DuckDB over S3, offline: httpfs comes from the PyPI package
`duckdb-ext-httpfs` (same version as `duckdb`), never downloaded at run time.

    con = connect_duckdb(endpoint_url=..., access_key=..., secret_key=..., region=...)
    con.sql("SELECT kpi_code, count(*) FROM read_parquet('s3://bucket/kpi_results/**/*.parquet',"
            " hive_partitioning = true) GROUP BY 1")

DuckDB is an optional dependency (`pip install analytics-engine[lake]`); this module imports it
lazily so the service never needs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class LakeSqlUnavailable(RuntimeError):
    """DuckDB or its httpfs extension package is not installed (or versions differ)."""


def httpfs_extension_dir() -> Path:
    """The `extension_directory` holding httpfs, as shipped by `duckdb-ext-httpfs`."""
    spec = importlib.util.find_spec("duckdb_ext")
    if spec is None or not spec.submodule_search_locations:
        raise LakeSqlUnavailable(
            "duckdb-ext-httpfs is not installed (pip install duckdb-ext-httpfs==<duckdb version>)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "extensions"
        if candidate.is_dir():
            return candidate
    raise LakeSqlUnavailable("duckdb-ext-httpfs is installed but holds no extensions directory")


def connect_duckdb(
    *,
    endpoint_url: str,
    access_key: str | None,
    secret_key: str | None,
    region: str = "us-east-1",
) -> Any:
    """An in-memory DuckDB connection that can read `s3://` paths at `endpoint_url`."""
    try:
        import duckdb  # optional dependency, imported on use
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise LakeSqlUnavailable("duckdb is not installed (pip install duckdb)") from exc
    con = duckdb.connect(":memory:")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET extension_directory = ?", [str(httpfs_extension_dir())])
    try:
        con.execute("LOAD httpfs")
    except duckdb.Error as exc:
        raise LakeSqlUnavailable(
            f"cannot load httpfs for duckdb {duckdb.__version__}: install duckdb-ext-httpfs of "
            f"the same version ({exc})"
        ) from exc
    parts = urlsplit(endpoint_url)
    con.execute(
        "CREATE SECRET lake (TYPE s3, KEY_ID ?, SECRET ?, REGION ?, ENDPOINT ?, "
        "URL_STYLE 'path', USE_SSL ?)",
        [access_key or "", secret_key or "", region, parts.netloc, parts.scheme == "https"],
    )
    return con
