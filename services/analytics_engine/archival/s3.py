"""The lake's object store: boto3 (blocking) run on a small dedicated thread pool.

Every failure of S3 surfaces as `TransientError`: the data is never at fault when S3 cannot
take it (outage, 5xx, throttling, even a misconfigured credential), so the bus retries with
backoff and never dead-letters a good event because of the lake.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from analytics_engine.core.errors import TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")

DELETE_BATCH = 1000
"""Keys per DeleteObjects request (the S3 maximum)."""
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def make_client(
    *,
    endpoint_url: str,
    access_key: str | None,
    secret_key: str | None,
    region: str,
    concurrency: int = 10,
    connect_timeout: float = 3.0,
    read_timeout: float = 30.0,
) -> Any:
    """A boto3 S3 client for the lake (path-style addressing: MinIO and SeaweedFS)."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Our callers retry with backoff; a short botocore retry only smooths blips.
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=concurrency,
        ),
    )


class ObjectStore:
    """Puts, gets and checks objects in one bucket, creating the bucket when it is missing."""

    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        region: str,
        concurrency: int = 8,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self._client: Any = make_client(
            endpoint_url=endpoint_url,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            concurrency=concurrency,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3")
        self._bucket_ready = False

    async def _run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                raise
            if _status(exc) < 500 and _code(exc) not in ("SlowDown", "RequestTimeout"):
                log.error("S3 rejected a request", extra={"code": _code(exc)})
            raise TransientError(f"S3 error {_code(exc) or _status(exc)}: {exc}") from exc
        except BotoCoreError as exc:  # EndpointConnectionError, ConnectTimeout, ReadTimeout...
            raise TransientError(f"S3 unreachable: {exc}") from exc

    async def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (idempotent, cached once it exists)."""
        if self._bucket_ready:
            return
        try:
            await self._run(self._client.head_bucket, Bucket=self.bucket)
        except ClientError:
            try:
                await self._run(self._client.create_bucket, Bucket=self.bucket)
            except TransientError as exc:
                code = _code(exc.__cause__) if isinstance(exc.__cause__, ClientError) else ""
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            log.info("created bucket", extra={"bucket": self.bucket})
        self._bucket_ready = True

    async def put(self, key: str, body: bytes) -> None:
        """Write one object; returns once S3 acknowledged it (durably stored)."""
        await self.ensure_bucket()
        try:
            await self._run(
                self._client.put_object,
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType="application/vnd.apache.parquet",
            )
        except ClientError as exc:  # NoSuchBucket: deleted under us; recreate next time
            self._bucket_ready = False
            raise TransientError(f"S3 bucket missing: {exc}") from exc

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        await self.ensure_bucket()

        def fetch() -> bytes:
            # request and body in one thread call: the connection is back in the pool before
            # the next request starts (many GETs at once, as a compaction does, overflowed it)
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            return bytes(response["Body"].read())

        try:
            return await self._run(fetch)
        except ClientError:
            return None

    async def exists(self, key: str) -> bool:
        await self.ensure_bucket()
        try:
            await self._run(self._client.head_object, Bucket=self.bucket, Key=key)
        except ClientError:
            return False
        return True

    async def list_objects(self, prefix: str) -> list[tuple[str, int]]:
        """Every object under `prefix`: (key, size in bytes), in key order."""
        await self.ensure_bucket()

        def listing() -> list[tuple[str, int]]:
            found: list[tuple[str, int]] = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                found.extend((str(o["Key"]), int(o["Size"])) for o in page.get("Contents", []))
            return found

        try:
            return await self._run(listing)
        except ClientError as exc:  # NoSuchBucket: deleted under us; recreate next time
            self._bucket_ready = False
            raise TransientError(f"S3 bucket missing: {exc}") from exc

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete objects (1000 per request, the S3 maximum); a key already gone is no error.
        Raises `TransientError` if any could not be deleted."""
        for first in range(0, len(keys), DELETE_BATCH):
            chunk = keys[first : first + DELETE_BATCH]
            try:
                response = await self._run(
                    self._client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
                )
            except ClientError as exc:
                raise TransientError(f"S3 delete failed: {exc}") from exc
            errors = response.get("Errors") or []
            if errors:
                first_error = errors[0]
                raise TransientError(
                    f"S3 could not delete {len(errors)} objects, e.g. {first_error.get('Key')}: "
                    f"{first_error.get('Code')}"
                )

    async def reachable(self) -> bool:
        """For /readyz: the bucket answers."""
        try:
            await self._run(self._client.head_bucket, Bucket=self.bucket)
        except (TransientError, ClientError):
            return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
