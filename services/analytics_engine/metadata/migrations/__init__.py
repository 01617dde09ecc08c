"""Versioned SQL migrations of the metadata service: `NNNN_name.sql`, applied in order."""
