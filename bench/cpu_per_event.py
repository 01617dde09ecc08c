"""CPU time per event of the simulator's and the calculation engine's own work, no I/O.

Run: `.venv/bin/python bench/cpu_per_event.py [--events 60000] [--runs 5] [--rate 20000]`

Every figure is `time.process_time()` per event (us), the median of `--runs` runs, so it holds on
a shared machine where wall-clock figures do not. What is measured is the Python work of each
process per event; Redis round trips are replaced by their client-side cost (the command
packing redis-py does) or left out:

simulator
  generate   `EventGenerator.next_batch` in batches of rate/100 (the controller's batch)
  envelope   the batch's wire bytes (ids, `EventPublisher.encode_batch`), as the controller
  encode     the publish function's arguments + packing the FCALL (the services' packer)
  total      the above together
calculation (the `StreamProcessor` with the sample KPIs plus the two 1 s freshness KPIs of
`pipeline_bench.py`, fed what the simulator produced, in XREADGROUP-sized batches)
  parse      `parse_event` of the wire bytes + `Delivery` (the core consumer's part)
  handle     `StreamProcessor.handle`: merge, engine, results (publish encoding, no I/O)
  checkpoint `checkpoint_data()` once per second of events at `--rate`, per event
  total      the above together
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from analytics_engine.calculation.cache import LatestResults
from analytics_engine.calculation.metrics import CalculationMetrics
from analytics_engine.calculation.processor import StreamProcessor
from analytics_engine.core.bus import (
    FIELD,
    PUBLISH_FUNCTION,
    Delivery,
    EncodedEvent,
    EventPublisher,
    decode_lazily,
    encode_event,
)
from analytics_engine.core.channels import stream_key
from analytics_engine.core.envelopes import parse_event
from analytics_engine.core.redis import hiredis_packing
from analytics_engine.kpi import VersionedKPIDefinition, load_definitions_dir
from analytics_engine.simulator.config import GeneratorConfig
from analytics_engine.simulator.generator import EventGenerator

REPO = Path(__file__).resolve().parents[1]
SECOND_KPIS = [
    {
        "code": "fresh_orders_count",
        "display_name": "Orders per second",
        "entity_type": "order",
        "aggregation": "count",
        "window": {"type": "tumbling", "size": "1s", "allowed_lateness": "0s"},
    },
    {
        "code": "fresh_revenue_by_region",
        "display_name": "Revenue per second by region",
        "entity_type": "order",
        "aggregation": "sum",
        "field": "amount",
        "group_by": ["region"],
        "window": {"type": "tumbling", "size": "1s", "allowed_lateness": "0s"},
    },
]


class _NoRedisPublisher(EventPublisher):
    """The core publisher with the function call replaced by the packing of it (by the
    services' connection class: `core.redis.connect`'s)."""

    def __init__(self, source: str) -> None:
        super().__init__(Redis(), source=source, stream_maxlen=1_000_000)
        self._conn = hiredis_packing(Connection)()

    async def publish_encoded(self, events: Sequence[EncodedEvent]) -> None:
        if events:
            keys, args = self._call_arguments(events)
            self._conn.pack_command("FCALL", PUBLISH_FUNCTION, len(keys), *keys, *args)


# -- simulator --------------------------------------------------------------------------------
def simulator(args: argparse.Namespace) -> dict[str, float]:
    batch = max(1, int(args.rate / 100))
    n = args.events
    publisher = _NoRedisPublisher("data_simulator")
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def generator() -> EventGenerator:
        gen = EventGenerator(GeneratorConfig(seed=42, run_id="bench"))
        gen.next_batch(100_000, start)  # a full live population, as after a few seconds
        return gen

    samples: dict[str, list[float]] = {"generate": [], "envelope": [], "encode": []}
    for _ in range(args.runs):
        gen = generator()
        cpu = dict.fromkeys(samples, 0.0)
        for i in range(0, n, batch):
            now = start + timedelta(milliseconds=i)
            t0 = time.process_time()
            first = gen.sequence
            items = gen.next_batch(batch, now)
            t1 = time.process_time()
            ids = [gen.event_id(first + j) for j in range(len(items))]
            encoded = publisher.encode_batch(items, ids, now)
            t2 = time.process_time()
            keys, arguments = publisher._call_arguments(encoded)
            publisher._conn.pack_command("FCALL", PUBLISH_FUNCTION, len(keys), *keys, *arguments)
            t3 = time.process_time()
            cpu["generate"] += t1 - t0
            cpu["envelope"] += t2 - t1
            cpu["encode"] += t3 - t2
        for name, value in cpu.items():
            samples[name].append(value * 1e6 / n)
    out = {name: statistics.median(values) for name, values in samples.items()}
    out["total"] = out["generate"] + out["envelope"] + out["encode"]
    return out


# -- calculation ------------------------------------------------------------------------------
def definitions() -> list[VersionedKPIDefinition]:
    samples = [d.model_dump() for d in load_definitions_dir(REPO / "k8s" / "samples")]
    return [
        VersionedKPIDefinition.model_validate({**d, "version": 1}) for d in samples + SECOND_KPIS
    ]


def wire_events(n: int, rate: float) -> list[tuple[str, bytes, bytes]]:
    """(channel, stream id, wire bytes) of created/updated events at `rate`, ids as Redis
    would assign them (publication in batches of rate/100)."""
    gen = EventGenerator(GeneratorConfig(seed=42, run_id="bench"))
    publisher = _NoRedisPublisher("data_simulator")
    batch = max(1, int(rate / 100))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    out: list[tuple[str, bytes, bytes]] = []
    seq: dict[int, int] = {}
    while len(out) < n:
        offset = len(out) / rate
        now = start + timedelta(seconds=offset)
        ms = int(now.timestamp() * 1000)
        first = gen.sequence
        for i, (channel, payload) in enumerate(gen.next_batch(batch, now)):
            if channel.endswith("deactivated"):
                continue
            event = publisher.make_event(
                channel, payload, event_id=gen.event_id(first + i), timestamp=now
            )
            s = seq.get(ms, 0)
            seq[ms] = s + 1
            out.append((channel, f"{ms}-{s}".encode(), encode_event(event)))
    return out[:n]


def _processor() -> StreamProcessor:
    from prometheus_client import CollectorRegistry

    publisher = _NoRedisPublisher("calculation_engine")
    runtime: Any = SimpleNamespace(
        redis=Redis(),
        service="calculation_engine",
        publisher=publisher,
        consume=lambda *a, **k: SimpleNamespace(
            ready=asyncio.Event(), lazy=k.get("lazy_events", False)
        ),
    )
    processor = StreamProcessor(
        runtime,
        consumer_name="bench",
        checkpoint_key="ae:calc:checkpoint",
        metrics=CalculationMetrics(CollectorRegistry()),
        cache=LatestResults(),
    )
    processor.set_definitions(definitions())
    return processor


def _forget_acks(processor: StreamProcessor) -> None:
    """What the checkpoint's acknowledgement does to the processor's state (no Redis here;
    nothing since the processor reads checkpointed, without acknowledgements)."""
    unacked: Any = getattr(processor, "_unacked", None)
    if unacked is None:
        return
    if isinstance(unacked, list):  # the processor before it kept ids only
        unacked.clear()
    else:
        processor._unacked = {channel: [] for channel in unacked}


def calculation(args: argparse.Namespace) -> dict[str, float]:
    n = args.events
    read = 500  # the consumer's batch: up to 500 entries of each stream per XREADGROUP
    items = wire_events(n, args.rate)
    keys = {c: stream_key(c).encode() for c, _, _ in items}

    channel_of = {v: k for k, v in keys.items()}

    processor = _processor()

    def parse(reply: list[tuple[bytes, tuple[bytes, dict[bytes, bytes]]]]) -> Sequence[Delivery]:
        """What the consumer hands the processor (lazily decoded where it asks for that)."""
        if getattr(processor.consumer, "lazy", False):
            return decode_lazily(reply, channel_of, {}, 10)[0]
        return [
            Delivery(entry_id, channel_of[key], parse_event(fields[FIELD]), 1)
            for key, (entry_id, fields) in reply
        ]

    per_checkpoint = int(args.rate)
    parse_samples, handle_samples, ckpt_samples, results = [], [], [], 0
    for _ in range(args.runs):
        processor = _processor()
        loop = asyncio.new_event_loop()
        handled = 0
        parse_cpu = handle_cpu = ckpt_cpu = 0.0
        try:
            for i in range(0, n, read):
                # an XREADGROUP reply as redis-py returns it (built per read, as in a service:
                # a backlog of parsed replies would inflate the garbage collector's work)
                reply = [(keys[c], (sid, {FIELD: raw})) for c, sid, raw in items[i : i + read]]
                t0 = time.process_time()
                deliveries = parse(reply)
                t1 = time.process_time()
                loop.run_until_complete(processor.handle(deliveries))
                t2 = time.process_time()
                parse_cpu += t1 - t0
                handle_cpu += t2 - t1
                handled += len(deliveries)
                del deliveries
                if handled >= per_checkpoint:
                    handled -= per_checkpoint
                    _, ring = processor.checkpoint_data()
                    processor.ring.written(ring)  # as after its MULTI: the next writes what is new
                    _forget_acks(processor)
                    ckpt_cpu += time.process_time() - t2
        finally:
            loop.close()
        results = processor.engine.stats().results_emitted
        parse_samples.append(parse_cpu * 1e6 / n)
        handle_samples.append(handle_cpu * 1e6 / n)
        ckpt_samples.append(ckpt_cpu * 1e6 / n)
    out = {
        "parse": statistics.median(parse_samples),
        "handle": statistics.median(handle_samples),
        "checkpoint": statistics.median(ckpt_samples),
    }
    out["total"] = out["parse"] + out["handle"] + out["checkpoint"]
    print(f"  (calculation: {n} events, {results} results, {len(definitions())} KPIs)")
    return out


def _as_in_a_service() -> None:
    """Tune the collector as the services' runtime does after startup (versions that do)."""
    try:
        from analytics_engine.core.heap import tune_gc
    except ImportError:
        return
    tune_gc(10_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=20_000.0)
    parser.add_argument("--only", choices=("simulator", "calculation"), default=None)
    args = parser.parse_args()
    _as_in_a_service()
    print(
        f"python {sys.version.split()[0]}; {args.events} events x {args.runs} runs; "
        f"rate {args.rate:g}/s; CPU us per event (median)"
    )
    if args.only in (None, "simulator"):
        for name, value in simulator(args).items():
            print(f"  simulator   {name:10} {value:7.2f} us")
    if args.only in (None, "calculation"):
        for name, value in calculation(args).items():
            print(f"  calculation {name:10} {value:7.2f} us")


if __name__ == "__main__":
    main()
