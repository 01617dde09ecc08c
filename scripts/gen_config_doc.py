"""Write docs/configuration.md from the services' pydantic Settings (`--check`: fail on drift).

Every environment variable a service reads is a field of its Settings class, so this page is
generated rather than written: it cannot fall behind the code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from analytics_engine.cli import SERVICES

TARGET = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
SECRET_WORDS = frozenset({"password", "passwords", "secret", "secrets", "token", "tokens"})
DURATION_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def env_name(name: str, info: FieldInfo) -> str:
    alias = info.validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        return " / ".join(str(c) for c in alias.choices)
    return name.upper()


def is_secret(name: str, info: FieldInfo) -> bool:
    """A field that may hold a credential: `repr=False` (how the Settings classes mark them) or
    a name ending in a secret word. Not any substring: `CALCULATION_CHECKPOINT_KEY` names a
    Redis key and `GATEWAY_SSE_TOKEN_TTL` a lifetime, neither a secret."""
    return info.repr is False or name.lower().rsplit("_", 1)[-1] in SECRET_WORDS


def holds_credential(value: Any) -> bool:
    """Whether a secret field's default would show a credential: a URL only by its password."""
    text = str(value)
    if "://" in text:
        return urlsplit(text).password is not None
    return bool(text)


def duration_text(value: timedelta) -> str:
    """A duration as one writes it in the environment (`7d`, `1h`, `50ms`), in the largest
    unit that represents it exactly."""
    millis, rest = divmod(value, timedelta(milliseconds=1))
    if rest or millis == 0:
        return f"{value.total_seconds():g}s"
    return next(f"{millis // size}{unit}" for unit, size in DURATION_UNITS if millis % size == 0)


def default_text(name: str, info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        return "(computed)"
    value: Any = info.default
    if value is PydanticUndefined or value is None:
        return "(unset)"
    if is_secret(name, info) and holds_credential(value):
        return "(set)"
    if isinstance(value, timedelta):
        return f"`{duration_text(value)}`"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, tuple | list):
        value = ",".join(str(item) for item in value)  # as the variable is written
    elif isinstance(value, set | frozenset):
        value = ",".join(sorted(str(item) for item in value))
    text = str(value)
    return f"`{text}`" if text else "(empty)"


def render() -> str:
    lines = [
        "# Configuration",
        "",
        "Generated from each service's `Settings` class by `python scripts/gen_config_doc.py`;",
        "a test fails when it drifts. Every variable is read by pydantic-settings; a bad or",
        "missing value stops the service at start with one line naming the variable.",
        "",
    ]
    sections = [
        (f"`{name}` ({entry.source})", importlib.import_module(entry.module).Settings)
        for name, entry in SERVICES.items()
    ]
    sections += [
        (title, getattr(importlib.import_module(module), cls)) for title, module, cls in TOOLS
    ]
    for title, settings in sections:
        lines += [f"## {title}", "", "| variable | default | meaning |", "|---|---|---|"]
        for field_name, info in settings.model_fields.items():
            meaning = " ".join((info.description or "").split())
            row = f"| `{env_name(field_name, info)}` | {default_text(field_name, info)} | "
            lines.append(row + meaning.replace("|", "\\|") + " |")
        lines.append("")
    return "\n".join(lines)


TOOLS = (
    ("`analytics-engine verify`", "analytics_engine.verify.cli", "VerifySettings"),
    (
        "`analytics-engine redis-functions`",
        "analytics_engine.redis_functions",
        "RedisFunctionsSettings",
    ),
    (
        "`python -m analytics_engine_operator.release` (the chart's pre-delete hook)",
        "analytics_engine_operator.settings",
        "ReleaseSettings",
    ),
)
"""Settings classes of the commands that are not services (title, module, class)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print("docs/configuration.md is out of date: run scripts/gen_config_doc.py")
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
