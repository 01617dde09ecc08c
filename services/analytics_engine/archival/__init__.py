"""Archival Service: the Parquet lakehouse on S3 (KPI results and expired entity events)."""
