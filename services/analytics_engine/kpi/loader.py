"""Load KPI definitions from a directory of YAML files (``KPI_DEFINITIONS_DIR``, k8s samples).

A file holds one definition, a list of definitions, or Kubernetes ``KPIDefinition`` custom
resources (``apiVersion/kind/metadata/spec``: the ``spec`` is the definition; a missing
``spec.code`` defaults to ``metadata.name``); several YAML documents (``---``) may be combined.
All problems of all files are collected so one run shows every mistake, each naming the file,
the document/item and the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from analytics_engine.kpi.definitions import FieldError, KPIDefinition, validation_errors

__all__ = [
    "DefinitionLoadError",
    "load_definitions_dir",
    "load_definitions_file",
    "load_valid_definitions",
]

CRD_KIND = "KPIDefinition"


class DefinitionLoadError(ValueError):
    """One or more definition files are invalid; ``errors`` holds ``(file, FieldError)``."""

    def __init__(self, errors: list[tuple[Path, FieldError]]) -> None:
        self.errors = errors
        lines = [f"{path}: {e.field or '<document>'}: {e.message}" for path, e in errors]
        super().__init__("invalid KPI definitions:\n" + "\n".join(lines))


def _candidates(doc: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(location, definition data) pairs in one YAML document."""
    if doc is None:
        return
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            yield from _candidates(item, f"{prefix}[{i}]")
        return
    if isinstance(doc, dict) and ("apiVersion" in doc or "kind" in doc or "spec" in doc):
        kind = doc.get("kind")
        if kind != CRD_KIND:
            raise _LocatedError(prefix, "kind", f"expected kind {CRD_KIND!r}, got {kind!r}")
        spec = doc.get("spec")
        if not isinstance(spec, dict):
            raise _LocatedError(prefix, "spec", "a KPIDefinition resource needs a spec mapping")
        name = (doc.get("metadata") or {}).get("name")
        yield prefix, ({"code": name, **spec} if "code" not in spec and name else spec)
        return
    yield prefix, doc


class _LocatedError(Exception):
    def __init__(self, prefix: str, field: str, message: str) -> None:
        super().__init__(message)
        self.error = FieldError(_join(prefix, field), message)


def _join(prefix: str, field: str) -> str:
    if not prefix:
        return field
    return f"{prefix}.{field}" if field else prefix


def load_definitions_file(path: Path) -> list[KPIDefinition]:
    """Definitions in one file; raises :class:`DefinitionLoadError`."""
    errors: list[tuple[Path, FieldError]] = []
    definitions = _load_file(path, errors)
    if errors:
        raise DefinitionLoadError(errors)
    return definitions


def _load_file(path: Path, errors: list[tuple[Path, FieldError]]) -> list[KPIDefinition]:
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as exc:
        errors.append((path, FieldError("", f"cannot read: {exc}")))
        return []
    except yaml.YAMLError as exc:
        errors.append((path, FieldError("", f"invalid YAML: {exc}")))
        return []
    found: list[KPIDefinition] = []
    for index, doc in enumerate(docs):
        prefix = f"document {index + 1}" if len(docs) > 1 else ""
        try:
            items = list(_candidates(doc, prefix))
        except _LocatedError as exc:
            errors.append((path, exc.error))
            continue
        for where, data in items:
            problems = validation_errors(data)
            if problems:
                errors.extend(
                    (path, FieldError(_join(where, e.field), e.message)) for e in problems
                )
            else:
                found.append(KPIDefinition.model_validate(data))
    return found


def load_definitions_dir(path: str | Path) -> list[KPIDefinition]:
    """All definitions in ``*.yaml``/``*.yml`` files directly in ``path`` (sorted by file name).

    Raises :class:`DefinitionLoadError` listing every invalid file/field, and for codes defined
    more than once."""
    definitions, problems = load_valid_definitions(path)
    if problems is not None:
        raise problems
    return definitions


def load_valid_definitions(
    path: str | Path,
) -> tuple[list[KPIDefinition], DefinitionLoadError | None]:
    """The definitions of every valid file in ``path``, and what was left out: a file with any
    error, and a code already defined in an earlier file (the metadata service's seeding rule),
    so that one bad file does not keep the good ones out."""
    directory = Path(path)
    if not directory.is_dir():
        return [], DefinitionLoadError([(directory, FieldError("", "not a directory"))])
    errors: list[tuple[Path, FieldError]] = []
    definitions: list[KPIDefinition] = []
    origin: dict[str, Path] = {}
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    for file in files:
        problems: list[tuple[Path, FieldError]] = []
        found = _load_file(file, problems)
        if problems:
            errors.extend(problems)
            continue
        for definition in found:
            if definition.code in origin:
                message = f"KPI {definition.code!r} is already defined in {origin[definition.code]}"
                errors.append((file, FieldError("code", message)))
                continue
            origin[definition.code] = file
            definitions.append(definition)
    return definitions, DefinitionLoadError(errors) if errors else None
