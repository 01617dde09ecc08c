"""Free TCP ports on the loopback interface for locally started servers.

Ports are drawn at random below the kernel's ephemeral range (so an outgoing connection cannot
take one while a server restarts) and checked by binding them. Nothing is reserved: another
process may still take a port between the check and the server's own bind; the servers retry
once with new ports when that happens on their first start.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"

_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 20000
_ATTEMPTS = 200


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(_EPHEMERAL_RANGE_FILE.read_text().split()[0])
    return 32768


def _try_bind(host: str, port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return `count` distinct TCP ports that are free on `host` right now."""
    high = _ephemeral_low()
    held: list[socket.socket] = []
    try:
        for _ in range(_ATTEMPTS):
            if len(held) == count:
                break
            if high - _LOWEST_PORT > 1000:
                sock = _try_bind(host, random.randrange(_LOWEST_PORT, high))
            else:  # unusual ephemeral range: let the kernel choose
                sock = _try_bind(host, 0)
            if sock is not None:
                held.append(sock)
        if len(held) < count:
            raise RuntimeError(f"could not find {count} free TCP ports on {host}")
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port_pairs(count: int, offset: int, host: str = LOOPBACK) -> list[int]:
    """Return `count` distinct ports `p` such that `p` and `p + offset` are both free.

    For servers that derive a second port from the first (SeaweedFS: gRPC = HTTP + 10000).
    """
    high = _ephemeral_low() - offset
    low = max(1024, min(_LOWEST_PORT, high - 2000) - offset)
    held: list[socket.socket] = []
    bases: list[int] = []
    try:
        for _ in range(_ATTEMPTS * 2):
            if len(bases) == count:
                break
            base = random.randrange(low, high)
            first = _try_bind(host, base)
            if first is None:
                continue
            second = _try_bind(host, base + offset)
            held.append(first)
            if second is None:
                continue
            held.append(second)
            bases.append(base)
        if len(bases) < count:
            raise RuntimeError(f"could not find {count} free TCP port pairs on {host}")
        return bases
    finally:
        for sock in held:
            sock.close()


def free_port(host: str = LOOPBACK) -> int:
    """Return one TCP port that is free on `host` right now."""
    return free_ports(1, host)[0]
