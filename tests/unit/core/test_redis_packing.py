"""hiredis command packing is byte-identical to redis-py's, errors included."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from analytics_engine.core.redis import HiredisPacking, connect, hiredis_packing

FastConnection = hiredis_packing(Connection)

values = st.one_of(
    st.text(),
    st.binary(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
)
names = st.sampled_from(["SET", "EVALSHA", "CONFIG GET", b"XACK", b"CLIENT SETNAME"])


def packed(connection: Connection, *args: object) -> bytes:
    return b"".join(connection.pack_command(*args))  # type: ignore[arg-type]


@given(names, st.lists(values, max_size=20))
def test_same_bytes_as_redis_py(name: str | bytes, args: list[object]) -> None:
    assert packed(FastConnection(), name, *args) == packed(Connection(), name, *args)


def test_what_hiredis_does_not_take_goes_through_redis_py() -> None:
    assert packed(FastConnection(), "SET", bytearray(b"k"), "v") == packed(
        Connection(), "SET", bytearray(b"k"), "v"
    )
    for bad in (None, True, object()):
        with pytest.raises(DataError, match="Invalid input"):
            FastConnection().pack_command("SET", "k", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "base"),
    [("redis://127.0.0.1:1/0", Connection), ("unix:///tmp/none.sock", UnixDomainSocketConnection)],
)
def test_every_client_packs_with_hiredis(url: str, base: type) -> None:
    cls = connect(url).connection_pool.connection_class
    assert issubclass(cls, HiredisPacking)
    assert issubclass(cls, base)
    assert hiredis_packing(cls) is cls
