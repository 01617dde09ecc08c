"""The Redis Function library that publishing calls (`FCALL`), and its loading.

Services may not run Lua of their own: their ACL users hold `+fcall` and none of `eval`,
`evalsha`, `script|*` or `function|*`, so a leaked service credential can neither freeze Redis
with a busy script nor run arbitrary code in it. The code they call is loaded by the `admin`
user only (`FUNCTION LOAD REPLACE`, idempotent): the local stack's Redis when it starts
(`localstack.RedisServer`), the Helm chart's Redis pod at each start (a postStart hook), and,
for an external Redis, `analytics-engine redis-functions`.

Names carry a version (`LIBRARY`, `PUBLISH_FUNCTION`): a change of the code gets new names, so
during a rolling upgrade old pods keep calling the old function while new pods call the new
one, both loaded side by side. Functions persist in Redis's AOF/RDB like data; a Redis started
on an empty volume has none until its loader ran, and publishing meanwhile fails with
`FunctionMissing`, a transient error (nothing was written): callers back off and retry as they
do for a Redis outage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

if TYPE_CHECKING:
    import redis
    from redis.asyncio import Redis

LIBRARY: Final = "analytics_engine_v1"
PUBLISH_FUNCTION: Final = "ae_publish_v1"

# One call per batch: for each event, XADD to its stream (durable channels) and PUBLISH the same
# bytes. A function runs atomically like MULTI/EXEC, so a durable consumer never misses what a
# live subscriber saw; and it costs redis-py one command to pack instead of two per event, which
# is what limits a Python publisher (measured: ~6k events/s with per-event commands, > 20k/s so).
# argv: the field name; per key, its length cap; per key, 1 if it applies backpressure (never
# trimmed here) or 0 (trimmed to its cap); then per event: keys index or 0, channel, data.
# Returns the keys indexes of backpressure streams now at or over their cap. The lengths are read
# before anything is written, so that a refused read (an ACL without XLEN) writes nothing.
# The streams are declared keys (`FCALL name numkeys key...`), so Redis checks them against the
# caller's ACL before running it, and every call inside runs with the caller's permissions.
# No flags: it writes (not `no-writes`), so Redis refuses the whole call when out of memory.
PUBLISH_BODY: Final = """
local function publish(keys, argv)
  local field = argv[1]
  local n = #keys
  local length = {}
  for k = 1, n do
    if argv[1 + n + k] == '1' then
      length[k] = redis.call('XLEN', keys[k])
    end
  end
  for i = 2 * n + 2, #argv, 3 do
    local k = tonumber(argv[i])
    if k > 0 then
      if length[k] then
        redis.call('XADD', keys[k], '*', field, argv[i + 2])
        length[k] = length[k] + 1
      else
        redis.call('XADD', keys[k], 'MAXLEN', '~', argv[1 + k], '*', field, argv[i + 2])
      end
    end
    redis.call('PUBLISH', argv[i + 1], argv[i + 2])
  end
  local full = {}
  for k = 1, n do
    if length[k] and length[k] >= tonumber(argv[1 + k]) then
      full[#full + 1] = k
    end
  end
  return full
end
"""

LIBRARY_CODE: Final = (
    f"#!lua name={LIBRARY}\n"
    "-- AnalyticsEngine's Redis functions. Generated from analytics_engine.core.bus.functions;\n"
    "-- load as the admin user: FUNCTION LOAD REPLACE (services may only FCALL).\n"
    + PUBLISH_BODY
    + f"\nredis.register_function{{function_name='{PUBLISH_FUNCTION}', callback=publish}}\n"
)
"""The library's source, as `FUNCTION LOAD` takes it (the chart ships a copy:
`charts/analytics-engine/files/redis-functions.lua`, written by scripts/render_redis_acl.py)."""

FIX: Final = (
    "load it as the Redis admin user: `analytics-engine redis-functions` (with REDIS_ADMIN_URL), "
    "or `redis-cli --user admin -x FUNCTION LOAD REPLACE "
    "< charts/analytics-engine/files/redis-functions.lua`; the chart's Redis pod loads it "
    "at start, `analytics-engine up` when it starts Redis"
)


class FunctionMissing(RedisConnectionError):
    """Redis does not have the publish function (yet): a Redis restarted on an empty volume
    before its loader ran, or a `FUNCTION FLUSH`. Nothing was published.

    A `ConnectionError`, as redis-py's own `BusyLoadingError` (a Redis loading its data): the
    server is there but not ready, so every caller treats it as an outage (`REDIS_ERRORS`),
    backs off and retries, and never dead-letters events for it."""

    def __init__(self) -> None:
        super().__init__(
            f"Redis function {PUBLISH_FUNCTION} (library {LIBRARY}) is not loaded: {FIX}"
        )


def is_function_missing(exc: ResponseError) -> bool:
    """Whether `exc` is Redis's reply to an FCALL of a function it does not have."""
    return "function not found" in str(exc).lower()


def load_library_sync(client: redis.Redis) -> None:
    """Load (or replace) the library, as a user allowed to (`admin`). Idempotent."""
    client.function_load(LIBRARY_CODE, replace=True)


async def load_library(client: Redis) -> None:
    """`load_library_sync` on an asyncio client."""
    await client.function_load(LIBRARY_CODE, replace=True)
