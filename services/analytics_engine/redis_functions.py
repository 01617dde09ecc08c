"""`analytics-engine redis-functions`: load the platform's Redis functions into a Redis the
platform did not start (an external Redis), as its admin user.

Services publish through a Redis function (`core.bus.functions`) that they may call but not
load. The chart's Redis and `analytics-engine up` load it themselves; any other Redis needs
this once per new library version (and after being emptied): `FUNCTION LOAD REPLACE`,
idempotent, so running it again does no harm.
"""

from __future__ import annotations

import sys

import redis
from pydantic import Field, RedisDsn
from pydantic_settings import BaseSettings, SettingsConfigDict

from analytics_engine.core.bus.functions import LIBRARY, load_library_sync
from analytics_engine.core.settings import ConfigurationError, load_settings


class RedisFunctionsSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    redis_admin_url: RedisDsn = Field(
        validation_alias="REDIS_ADMIN_URL",
        repr=False,  # holds the password
        description="Redis as a user allowed to load functions (`FUNCTION LOAD`), such as the "
        "`admin` user of the platform's ACL file; the services' users may not.",
    )


def run_redis_functions() -> int:
    """Entry point of `analytics-engine redis-functions`; returns the exit code."""
    try:
        settings = load_settings(RedisFunctionsSettings)
    except ConfigurationError:
        return 2  # load_settings printed the one line
    try:
        with redis.Redis.from_url(str(settings.redis_admin_url)) as client:
            load_library_sync(client)
    except redis.RedisError as exc:
        print(f"redis-functions: {exc}", file=sys.stderr)
        return 1
    print(f"loaded Redis function library {LIBRARY}")
    return 0
