"""Write the JSON Schemas of the protocol into docs/schemas/ (`--check`: fail on drift)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analytics_engine.core.schemas import all_schemas, render

TARGET = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    expected = {name: render(schema) for name, schema in all_schemas().items()}
    if args.check:
        actual = {p.name: p.read_text() for p in TARGET.glob("*.schema.json")}
        if actual != expected:
            print("docs/schemas is out of date: run python scripts/gen_schemas.py", file=sys.stderr)
            return 1
        return 0
    TARGET.mkdir(parents=True, exist_ok=True)
    for stale in set(p.name for p in TARGET.glob("*.schema.json")) - set(expected):
        (TARGET / stale).unlink()
    for name, text in expected.items():
        (TARGET / name).write_text(text)
    print(f"wrote {len(expected)} schemas to {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
