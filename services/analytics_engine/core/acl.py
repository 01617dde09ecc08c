"""Least-privilege Redis ACL users, one per service, derived from the channel table.

Redis 7 ACLs restrict commands, keys and pub/sub channels. Pub/sub permissions cannot tell
PUBLISH from SUBSCRIBE, so a service is granted exactly the channels it publishes or reads.
Streams are finer: a selector grants XADD only on the streams a service produces (and its
dead-letter streams), while the stream-reading commands apply only to the streams it consumes.
So the simulator's credentials can append to `simulation.*` but cannot publish a KPI result, and
the calculation engine can read entity events but cannot forge them.

Reading a stream through a consumer group needs write access to it (XREADGROUP and XACK write
the group's state), and Redis key permissions (`%R~`/`%W~`) cannot tell XACK from DEL. So the
generic key commands (DEL, RENAME, EXPIRE, SET, ... : the data-type and keyspace categories)
live in selectors of their own, confined to the keys the service owns (`state_keys`). A consumer
can neither delete, rename, expire nor overwrite the streams it reads, nor anyone's dead letters.

Pure: this module builds ACL lines; the local stack writes them to an ACL file and the Helm
chart renders the same file from values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from analytics_engine.core import channels as ch

REPLY_PATTERN = "reply.*"


@dataclass(frozen=True)
class ServiceAccess:
    """What one service does on the bus."""

    publishes: tuple[str, ...] = ()  # event channels (patterns allowed)
    consumes: tuple[str, ...] = ()  # durable channels read through a consumer group
    rewinds: tuple[str, ...] = ()  # of those, read `checkpointed`: it moves its group (SETID)
    listens: tuple[str, ...] = ()  # live pub/sub channels or patterns
    serves: tuple[str, ...] = ()  # request channels it answers
    requests: tuple[str, ...] = ()  # request channels it calls
    state_keys: tuple[str, ...] = ()  # private key patterns, e.g. its checkpoint
    deletes: tuple[str, ...] = ()  # of `consumes`, private streams it deletes once read (replays)
    watches: tuple[str, ...] = ()  # streams it produces and reads the length of (backpressure)
    reads_all_streams: bool = False  # observability: lengths of every stream and dead-letter stream
    trims_streams: bool = False  # observability: trims streams below what readers consumed
    tool: bool = False  # a command-line tool, not a running service: it sends no heartbeats
    extra: dict[str, str] = field(default_factory=dict)


ENTITY = (ch.ENTITY_CREATED, ch.ENTITY_UPDATED, ch.ENTITY_DEACTIVATED)
STREAM_CONTROL = (ch.STREAM_SUBSCRIBE, ch.STREAM_UNSUBSCRIBE, ch.STREAM_HEARTBEAT)
REPLAY = f"{ch.REPLAY_PREFIX}*"

SERVICE_ACCESS: Mapping[str, ServiceAccess] = {
    "data_simulator": ServiceAccess(
        publishes=(*ENTITY, ch.SIMULATION_TICK),
        consumes=(ch.METADATA_CHANGED,),  # entity definitions changed: refresh them
        requests=(ch.METADATA_LOOKUP,),
    ),
    "database_service": ServiceAccess(
        consumes=(*ENTITY, ch.KPI_CALCULATED, ch.ARCHIVAL_CONFIRMED, *STREAM_CONTROL),
        publishes=(ch.ARCHIVE_KPI_RESULTS, ch.ARCHIVAL_EVENTS, REPLAY),
        watches=(REPLAY,),
        serves=(ch.DATABASE_QUERY, ch.DATABASE_COMMAND),
        state_keys=(f"{ch.KEY_PREFIX}db:*",),
    ),
    "calculation_engine": ServiceAccess(
        consumes=(ch.ENTITY_CREATED, ch.ENTITY_UPDATED, ch.METADATA_CHANGED, REPLAY),
        rewinds=(ch.ENTITY_CREATED, ch.ENTITY_UPDATED),
        deletes=(REPLAY,),  # a backfill's replay stream, made for it alone, once it has read it
        publishes=(ch.KPI_CALCULATED, f"{ch.KPI_CALCULATED_PREFIX}*", *STREAM_CONTROL),
        requests=(ch.DATABASE_QUERY, ch.DATABASE_COMMAND, ch.METADATA_LOOKUP),
        state_keys=(f"{ch.KEY_PREFIX}calc:*",),
    ),
    "archival_service": ServiceAccess(
        consumes=(ch.ARCHIVE_KPI_RESULTS, ch.ARCHIVAL_EVENTS),
        publishes=(ch.ARCHIVAL_CONFIRMED,),
        state_keys=(f"{ch.KEY_PREFIX}archival:*",),
    ),
    "metadata_service": ServiceAccess(
        publishes=(ch.METADATA_CHANGED,),
        serves=(ch.METADATA_LOOKUP,),
        requests=(ch.METADATA_LOOKUP,),
    ),
    "observability_service": ServiceAccess(
        consumes=(ch.SIMULATION_TICK,),
        listens=(ch.SERVICE_HEARTBEAT, f"{ch.KPI_CALCULATED_PREFIX}*"),
        reads_all_streams=True,
        trims_streams=True,
    ),
    "api_gateway": ServiceAccess(
        listens=(f"{ch.KPI_CALCULATED_PREFIX}*",),
        requests=(ch.DATABASE_QUERY, ch.METADATA_LOOKUP),
    ),
    # `analytics-engine verify` and other operator tooling: definitions and read queries only.
    "cli": ServiceAccess(requests=(ch.DATABASE_QUERY, ch.METADATA_LOOKUP), tool=True),
}


def running_services() -> list[str]:
    """The services that run (and send heartbeats), as opposed to tools."""
    return [name for name, access in SERVICE_ACCESS.items() if not access.tool]


# Commands every service needs: connection upkeep, transactions, pub/sub.
BASE_COMMANDS = (
    "+ping",
    "+echo",
    "+select",
    "+client|setname",
    "+client|id",
    "+multi",
    "+exec",
    "+discard",
    "+unwatch",
    "+publish",
    "+subscribe",
    "+psubscribe",
    "+unsubscribe",
    "+punsubscribe",
    # Publishing calls the publish function (`core.bus.functions`), which only the admin user
    # loads: what it may touch is checked call by call inside, with this user's permissions.
    # No EVAL, EVALSHA, SCRIPT or FUNCTION: a service cannot run Lua of its own (a busy loop
    # would freeze Redis) nor replace the function.
    "+fcall",
)
# Reading a stream through a consumer group (all of these write the group's state).
CONSUMER_COMMANDS = (
    "+xreadgroup",
    "+xack",
    "+xautoclaim",
    "+xclaim",
    "+xgroup|create",
    "+xpending",
    "+xinfo|groups",
    "+xinfo|stream",
    "+xlen",
    "+xrange",
    "+xrevrange",
    "+xread",
    "+time",
)
# Private state, in a selector confined to the service's own keys (`state_keys`): the data-type
# categories and key management (DEL, EXPIRE, RENAME, SCAN, ...) apply there only. The dangerous
# ones, such as KEYS, FLUSHALL and RESTORE, stay off.
STATE_COMMANDS = (
    "+@string",
    "+@hash",
    "+@set",
    "+@keyspace",
    "+watch",
    "-@dangerous",
)
# Request claims (`ae:rr:claim:*`, shared by every caller and responder): SET NX PX only.
CLAIM_COMMANDS = ("+set",)


def _stream_keys(patterns: Iterable[str]) -> list[str]:
    return [ch.stream_key(p) for p in patterns]


def acl_rules(service: str, access: ServiceAccess) -> list[str]:
    """ACL rules (after `user NAME on >password`) for one service."""
    durable_published = [p for p in access.publishes if ch.channel_spec(p.rstrip("*")).durable]
    channels = sorted(
        {
            *access.publishes,
            *access.consumes,
            *access.listens,
            *access.serves,
            *access.requests,
            ch.SERVICE_HEARTBEAT,
            f"reply.{service}.*",
            *((REPLY_PATTERN,) if access.serves else ()),
        }
    )
    rules = ["resetkeys", "resetchannels", "-@all", *BASE_COMMANDS]
    rules += [f"&{c}" for c in channels]
    if access.consumes:
        rules += CONSUMER_COMMANDS
        rules += [f"~{k}" for k in _stream_keys(access.consumes)]
    if access.rewinds:
        keys = " ".join(f"~{k}" for k in _stream_keys(access.rewinds))
        rules.append(f"(+xgroup|setid {keys})")
        # what its checkpoint covers, which retention keeps (core.retention)
        holds = " ".join(f"~{ch.stream_hold_key(c)}" for c in access.rewinds)
        rules.append(f"(+hset {holds})")
    if access.watches:
        rules += ["+xlen", "+xinfo|groups", "+xinfo|stream"]
        rules += [f"%R~{k}" for k in _stream_keys(access.watches)]
    if access.reads_all_streams:
        rules += ["+scan", "+xlen", "+xinfo|stream", "+xinfo|groups"]
        rules += [f"%R~{ch.stream_key('*')}", f"%R~{ch.dead_letter_key('*')}"]
    if access.trims_streams:
        # XTRIM alone may write every stream; what to trim is read from groups and holds
        rules += ["+xinfo|groups", "+xpending", "+hgetall"]
        rules += [f"%R~{ch.stream_key('*')}", f"%R~{ch.stream_hold_key('*')}"]
        rules.append(f"(+xtrim ~{ch.stream_key('*')})")
    dead_letters = [ch.dead_letter_key(c) for c in (*access.consumes, *access.serves)]
    if durable_published:
        # Publishing calls a function (FCALL declares the streams it appends to, XADD inside);
        # XLEN: the function and the publisher's backpressure look at how full they are.
        keys = " ".join(f"~{k}" for k in _stream_keys(durable_published))
        rules.append(f"(+fcall +xadd +xlen {keys})")
    if dead_letters:
        rules.append("(+xadd " + " ".join(f"%W~{k}" for k in dead_letters) + ")")
    # Key management only on keys the service owns: never on the streams it reads (with the
    # stream commands above it needs write access to them) nor on dead letters.
    if access.state_keys:
        keys = " ".join(f"~{k}" for k in access.state_keys)
        rules.append(f"({' '.join(STATE_COMMANDS)} {keys})")
    if access.serves or access.requests:  # request claims: callers abandon, responders claim
        rules.append(f"({' '.join(CLAIM_COMMANDS)} ~{ch.request_claim_key('*')})")
    if access.deletes:
        rules.append("(+del " + " ".join(f"~{k}" for k in _stream_keys(access.deletes)) + ")")
    return list(dict.fromkeys(rules))  # roles overlap (e.g. consumer and stream reader): once each


def acl_file(passwords: Mapping[str, str], *, admin_password: str) -> str:
    """An ACL file: the default user off, an `admin` user for operators and tests, one user per
    service with the password given for it."""
    lines = [
        # `default` stays off (no one can log in as it), but keeps its permissions: Redis 7.0
        # replays the append-only file as `default` and silently drops every MULTI/EXEC it may
        # not run (redis/redis#14541), which would lose data on every restart.
        "user default off ~* &* +@all",
        f"user admin on >{admin_password} ~* &* +@all",
    ]
    for service, access in SERVICE_ACCESS.items():
        if service in passwords:
            rules = " ".join(acl_rules(service, access))
            lines.append(f"user {service} on >{passwords[service]} {rules}")
    return "\n".join(lines) + "\n"
