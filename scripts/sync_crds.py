#!/usr/bin/env python3
"""Copy the KPIDefinition CRD and the sample KPIDefinitions from `k8s/` into the Helm chart.

`k8s/crds/` and `k8s/samples/` are the single source of truth; the chart carries byte-exact
copies (`charts/analytics-engine/crds/`, installed by Helm before the templates, and
`charts/analytics-engine/files/samples/`, rendered when `samples.enabled`).

    python scripts/sync_crds.py           # copy (stale copies in the chart are removed)
    python scripts/sync_crds.py --check   # exit 1 and name the files that drifted
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "analytics-engine"
# (source directory, chart directory) pairs; every *.yaml of the source is mirrored.
PAIRS = (
    (ROOT / "k8s" / "crds", CHART / "crds"),
    (ROOT / "k8s" / "samples", CHART / "files" / "samples"),
)


def plan() -> list[tuple[str, Path, bytes | None]]:
    """The changes that would make the chart match k8s/: (action, target, content)."""
    changes: list[tuple[str, Path, bytes | None]] = []
    for source_dir, target_dir in PAIRS:
        sources = {p.name: p.read_bytes() for p in sorted(source_dir.glob("*.yaml"))}
        if not sources:
            raise SystemExit(f"no *.yaml in {source_dir.relative_to(ROOT)}")
        for name, content in sources.items():
            target = target_dir / name
            if not target.is_file() or target.read_bytes() != content:
                changes.append(("write", target, content))
        for stale in sorted(target_dir.glob("*.yaml")):
            if stale.name not in sources:
                changes.append(("remove", stale, None))
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, change nothing")
    args = parser.parse_args(argv)

    changes = plan()
    for action, target, content in changes:
        rel = target.relative_to(ROOT)
        if args.check:
            print(f"drift: {rel} ({'differs from k8s/' if action == 'write' else 'not in k8s/'})")
        elif content is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            print(f"wrote {rel}")
        else:
            target.unlink()
            print(f"removed {rel}")
    if args.check and changes:
        print("run: python scripts/sync_crds.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
