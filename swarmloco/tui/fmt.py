"""Small, total formatting helpers for the monitor: every one accepts None and odd types."""

from __future__ import annotations

import math
import re
import time
from typing import Any

from swarmloco.display import PEER_ID_CHARS, fmt_bytes

DASH = "–"

_IP4_TCP = re.compile(r"^/ip4/([^/]+)/(?:tcp|udp)/(\d+)")
_IP6_TCP = re.compile(r"^/ip6/([^/]+)/(?:tcp|udp)/(\d+)")
_DNS_TCP = re.compile(r"^/dns[46]?/([^/]+)/(?:tcp|udp)/(\d+)")


def number(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def num(value: Any, digits: int = 2) -> str:
    v = number(value)
    return DASH if v is None else f"{v:.{digits}f}"


def integer(value: Any) -> str:
    v = number(value)
    return DASH if v is None else str(int(v))


def human_bytes(value: Any) -> str:
    """SI units (1 MB = 10^6 bytes), as every line and screen of swarmloco."""
    v = number(value)
    return DASH if v is None else fmt_bytes(v)


def seconds(value: Any) -> str:
    v = number(value)
    if v is None:
        return DASH
    if v < 10:
        return f"{v:.2f}s"
    if v < 120:
        return f"{v:.1f}s"
    return f"{int(v // 60)}m{int(v % 60):02d}s"


def age(value: Any) -> str:
    """A heartbeat age in seconds, compact: '3s', '2m05s', '1h12m'."""
    v = number(value)
    if v is None:
        return DASH
    v = max(0.0, v)
    if v < 60:
        return f"{int(v)}s"
    if v < 3600:
        return f"{int(v // 60)}m{int(v % 60):02d}s"
    return f"{int(v // 3600)}h{int(v % 3600 // 60):02d}m"


def short_peer_id(peer_id: Any, keep: int = PEER_ID_CHARS) -> str:
    """'12D3KooWAbc...xyz' -> its last 8 characters after '…' (libp2p ids share their first 8), the same
    length as in every log line and event."""
    if not isinstance(peer_id, str) or not peer_id:
        return DASH
    return peer_id if len(peer_id) <= keep + 1 else "…" + peer_id[-keep:]


def short_addr(maddrs: Any) -> str:
    """First multiaddr as host:port ('/ip4/1.2.3.4/tcp/4444/p2p/..' -> '1.2.3.4:4444')."""
    if isinstance(maddrs, str):
        maddrs = [maddrs]
    if not isinstance(maddrs, list) or not maddrs:
        return DASH
    addr = str(maddrs[0])
    if m := _IP4_TCP.match(addr) or _DNS_TCP.match(addr):
        return f"{m.group(1)}:{m.group(2)}"
    if m := _IP6_TCP.match(addr):
        return f"[{m.group(1)}]:{m.group(2)}"
    return addr.split("/p2p/", 1)[0] or addr


def clock_time(unix: Any) -> str:
    v = number(unix)
    return "--:--:--" if v is None else time.strftime("%H:%M:%S", time.localtime(v))
