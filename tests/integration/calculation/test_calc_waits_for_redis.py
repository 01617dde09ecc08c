"""Redis not up when the calculation engine starts (a pod scheduled before Redis is ready):
the engine waits for it instead of crashing on its checkpoint read, then starts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest
from calc_helpers import write_kpi_dir

from analytics_engine.calculation.service import Settings, create
from analytics_engine.localstack import RedisServer


async def test_the_engine_waits_for_redis_at_start(
    tmp_path: Path, unused_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{unused_tcp_port}/0",
        calculation_port=0,
        instance_id="calc-waits",
        kpi_definitions_dir=write_kpi_dir(tmp_path),
        metadata_timeout_s=0.5,
        heartbeat_interval_s=60,
        backfill_enabled=False,
    )
    service = create(settings)
    caplog.set_level(logging.WARNING, logger="analytics_engine.core.retry")
    run = asyncio.create_task(service.run())
    try:
        await asyncio.sleep(1.5)  # several attempts at the checkpoint
        assert not run.done(), "the engine gave up while Redis was down"
        assert any("redis not reachable" in r.getMessage() for r in caplog.records)
        with RedisServer(tmp_path / "redis", port=unused_tcp_port):
            await asyncio.wait_for(service.ready.wait(), 30)
            service.stop()
            await asyncio.wait_for(run, 30)
    finally:
        if not run.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
