"""Multiaddr checks for the text a user types (``--initial-peers``, ``--host-maddrs``, ``[swarm]``).

hivemind parses multiaddrs only once its DHT process and p2pd are starting, and then fails with a
traceback or a daemon error; these checks run first and say in one line what is wrong. They cover
the protocols a swarm uses (IP or DNS, TCP or UDP/QUIC, relays, the peer id); anything else is
refused by name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_NO_VALUE = {"quic", "quic-v1", "ws", "wss", "tls", "noise", "p2p-circuit", "webtransport", "http", "https"}
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{40,60}$")


@dataclass(frozen=True)
class Maddr:
    """The parts of a multiaddr a peer cares about."""

    text: str
    host: str | None = None
    """The IP address or DNS name."""
    family: str | None = None
    """ip4, ip6 or dns."""
    transport: str | None = None
    """tcp or udp."""
    port: int | None = None
    peer_id: str | None = None
    """The last /p2p/ component (the peer to dial)."""


def parse_maddr(text: str) -> Maddr:
    """Parse ``text``; ValueError with a one-line reason if it is not a multiaddr this swarm can use."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise ValueError("a multiaddr starts with '/', like /ip4/203.0.113.5/tcp/31337")
    parts = text.rstrip("/").split("/")[1:]
    if not parts:
        raise ValueError("empty multiaddr")
    fields: dict = {}
    i = 0
    while i < len(parts):
        proto = parts[i]
        if proto in _NO_VALUE:
            i += 1
            continue
        if i + 1 >= len(parts) or parts[i + 1] == "":
            raise ValueError(f"/{proto} needs a value")
        value = parts[i + 1]
        if proto in ("ip4", "ip6"):
            try:
                (ipaddress.IPv4Address if proto == "ip4" else ipaddress.IPv6Address)(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an {'IPv4' if proto == 'ip4' else 'IPv6'} address") from None
            fields.setdefault("host", value)
            fields.setdefault("family", proto)
        elif proto in ("dns", "dns4", "dns6", "dnsaddr"):
            if not _HOST.match(value):
                raise ValueError(f"{value!r} is not a host name")
            fields.setdefault("host", value)
            fields.setdefault("family", "dns")
        elif proto in ("tcp", "udp"):
            if not value.isdigit() or not 0 <= int(value) <= 65535:
                raise ValueError(f"{proto} port {value!r} is not a number from 0 to 65535")
            fields.setdefault("transport", proto)
            fields.setdefault("port", int(value))
        elif proto in ("p2p", "ipfs"):
            if not _BASE58.match(value):
                raise ValueError(f"{value!r} is not a peer id (like 12D3KooW...)")
            fields["peer_id"] = value
        else:
            raise ValueError(f"unknown protocol /{proto}")
        i += 2
    return Maddr(text=text, **fields)


def maddr_problem(text: str, *, listen: bool = False, dial: bool = False) -> str | None:
    """Why ``text`` cannot be used (None if it can): ``listen`` for an address to listen on (IP, TCP or
    UDP, no peer id), ``dial`` for a peer to join through (it must name the peer: /p2p/12D3KooW...)."""
    try:
        m = parse_maddr(text)
    except ValueError as e:
        return str(e)
    if m.transport is None and not (dial and m.peer_id and m.host is None):
        return "it names no tcp or udp port"
    if listen and m.family not in ("ip4", "ip6"):
        return "listen on an IP address, like /ip4/0.0.0.0/tcp/31337"
    if listen and m.peer_id:
        return "a listening address names no peer id (/p2p/...)"
    if dial and not m.peer_id:
        return "it must end with the peer's id, like .../tcp/31337/p2p/12D3KooW... (printed by that peer at start)"
    return None


__all__ = ["Maddr", "maddr_problem", "parse_maddr"]
