"""The event bus: every event is PUBLISHed on its channel (what external subscribers see, as the
spec documents) and, on durable channels, also appended to a Redis Stream that each subscribing
service reads through its own consumer group (at-least-once, survives consumer downtime).

All Redis I/O of events lives in this package, one module per job:

- `publisher`: `EventPublisher` (PUBLISH + XADD in one function call, backpressure);
- `functions`: the Redis Function library publishing calls (`FCALL`), loaded by the admin user;
- `consumer`: `DurableConsumer` (consumer groups, retries, claims, acknowledgements);
- `deliveries`: what a handler receives (`Delivery`, `DeliveryBatch`) and the decoding of entries;
- `dead_letters`: `DeadLetters`, the `ae:dlq:{channel}` streams;
- `live`: `LiveSubscription`, pub/sub that survives Redis restarts;
- `streams`: the stream field, Redis's connection errors and XREADGROUP.
"""

from analytics_engine.core.bus.consumer import DurableConsumer
from analytics_engine.core.bus.dead_letters import DEAD_LETTER_MAXLEN, DeadLetters
from analytics_engine.core.bus.deliveries import (
    BatchHandler,
    Delivery,
    DeliveryBatch,
    Rejected,
    decode_entries,
    decode_lazily,
)
from analytics_engine.core.bus.functions import (
    LIBRARY,
    LIBRARY_CODE,
    PUBLISH_FUNCTION,
    FunctionMissing,
)
from analytics_engine.core.bus.live import LiveSubscription
from analytics_engine.core.bus.publisher import (
    EncodedEvent,
    EventPublisher,
    encode_event,
)
from analytics_engine.core.bus.streams import (
    FIELD,
    REDIS_ERRORS,
    Entry,
    ids_by_channel,
    raw_entries,
    read_group,
    redis_outage_is_transient,
)

__all__ = [
    "DEAD_LETTER_MAXLEN",
    "FIELD",
    "LIBRARY",
    "LIBRARY_CODE",
    "PUBLISH_FUNCTION",
    "REDIS_ERRORS",
    "BatchHandler",
    "DeadLetters",
    "Delivery",
    "DeliveryBatch",
    "DurableConsumer",
    "EncodedEvent",
    "Entry",
    "EventPublisher",
    "FunctionMissing",
    "LiveSubscription",
    "Rejected",
    "decode_entries",
    "decode_lazily",
    "encode_event",
    "ids_by_channel",
    "raw_entries",
    "read_group",
    "redis_outage_is_transient",
]
