"""The swarm view: a table of peers from their DHT heartbeats, with a totals line."""

from __future__ import annotations

import statistics
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from swarmloco.tui import fmt

STATE_STYLES = {"training": "green", "averaging": "cyan", "joining": "yellow",
                "idle": "dim", "stopped": "dim", "stale": "bold red"}
COLUMNS = ("peer", "address", "step", "samples/s", "age", "state")


def peer_state(peer: dict, now: float, stale_after: float) -> str:
    """The peer's own state, or 'stale' when its heartbeat is older than ``stale_after``."""
    t = fmt.number(peer.get("time"))
    if t is None or now - t > stale_after:
        return "stale"
    return str(peer.get("state") or "?")


def latest_per_peer(peers: Any) -> list[dict]:
    """One record per peer id (the newest heartbeat wins); junk entries dropped."""
    if not isinstance(peers, list):
        return []
    best: dict[str, dict] = {}
    for peer in peers:
        if not isinstance(peer, dict):
            continue
        key = str(peer.get("peer_id") or "")
        old = best.get(key)
        if old is None or (fmt.number(peer.get("time")) or 0) >= (fmt.number(old.get("time")) or 0):
            best[key] = peer
    return list(best.values())


def swarm_totals(peers: list[dict], now: float, stale_after: float) -> dict[str, Any]:
    """Aggregates over live (non-stale) peers: count, throughput, step, round time, traffic."""
    live = [p for p in peers if peer_state(p, now, stale_after) != "stale"]
    steps = [v for p in live if (v := fmt.number(p.get("outer_step"))) is not None]
    rates = [v for p in live if (v := fmt.number(p.get("samples_per_second"))) is not None]
    rounds = [v for p in live if (v := fmt.number(p.get("round_time"))) is not None]
    traffic = [v for p in live if (v := fmt.number(p.get("bytes_per_round"))) is not None]
    return {
        "online": len(live),
        "stale": len(peers) - len(live),
        "samples_per_second": sum(rates) if rates else None,
        "outer_step": int(max(steps)) if steps else None,
        "round_time": statistics.median(rounds) if rounds else None,
        "bytes_per_round": sum(traffic) if traffic else None,
    }


class SwarmView(Vertical):
    """Shows the peer list; ``show()`` is the only way data gets in."""

    DEFAULT_CSS = """
    SwarmView { height: 1fr; padding: 0 1; }
    SwarmView #swarm-header { height: 1; }
    SwarmView #swarm-totals { height: 2; }
    SwarmView DataTable { height: 1fr; }
    """

    def __init__(self, stale_after: float = 10.0, source_label: str = "swarm",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stale_after = stale_after
        self.source_label = source_label
        self.peers: list[dict] | None = None
        self.reachable = True

    def compose(self) -> ComposeResult:
        yield Static(f"waiting for {self.source_label}…", id="swarm-header")
        yield Static("", id="swarm-totals")
        table: DataTable = DataTable(id="swarm-table", cursor_type="row", zebra_stripes=True)
        yield table

    def on_mount(self) -> None:
        table = self.query_one("#swarm-table", DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name)

    def show_no_source(self, message: str) -> None:
        """This monitor watches no swarm (not a failure: nothing to reach)."""
        self.query_one("#swarm-header", Static).update(Text(message, style="dim"))

    def show(self, peers: list[dict] | None, *, now: float, reachable: bool,
             error: str | None = None) -> None:
        """Render ``peers`` (None: keep the last list, re-aged against ``now``)."""
        self.reachable = reachable
        if peers is not None:
            self.peers = latest_per_peer(peers)
        header = Text()
        if not reachable:
            header.append(" UNREACHABLE ", style="bold white on red")
            header.append(f" {self.source_label} ")
            header.append("showing last data" if self.peers is not None else (error or ""),
                          style="dim")
        elif self.peers is None:
            header.append(f"waiting for {self.source_label}…", style="dim")
        else:
            header.append("swarm", style="bold")
            header.append(f"  from {self.source_label} · stale after {self.stale_after:g}s",
                          style="dim")
        self.query_one("#swarm-header", Static).update(header)
        if self.peers is None:
            return
        self._render_totals(now)
        self._render_table(now)

    def _render_totals(self, now: float) -> None:
        t = swarm_totals(self.peers or [], now, self.stale_after)
        line = Text()
        line.append(f"{t['online']}", style="bold green")
        line.append(" peers online")
        if t["stale"]:
            line.append(f" (+{t['stale']} stale)", style="red")
        line.append(f"  {fmt.num(t['samples_per_second'], 1)}", style="bold")
        line.append(" samples/s  step ")
        line.append(fmt.integer(t["outer_step"]), style="bold")
        line2 = Text(f"round time {fmt.seconds(t['round_time'])} (median over peers)"
                     f"  traffic {fmt.human_bytes(t['bytes_per_round'])}/round")
        self.query_one("#swarm-totals", Static).update(Text("\n").join([line, line2]))

    def _render_table(self, now: float) -> None:
        table = self.query_one("#swarm-table", DataTable)
        cursor = table.cursor_coordinate
        table.clear()
        peers = sorted(self.peers or [], key=lambda p: str(p.get("peer_id", "")))
        for peer in peers:
            state = peer_state(peer, now, self.stale_after)
            t = fmt.number(peer.get("time"))
            table.add_row(
                fmt.short_peer_id(peer.get("peer_id")),
                fmt.short_addr(peer.get("maddrs")),
                Text(fmt.integer(peer.get("outer_step")), justify="right"),
                Text(fmt.num(peer.get("samples_per_second"), 1), justify="right"),
                Text(fmt.age(now - t if t is not None else None), justify="right"),
                Text(state, style=STATE_STYLES.get(state, "")),
                key=str(peer.get("peer_id") or ""),
            )
        if table.row_count:
            table.move_cursor(row=min(cursor.row, table.row_count - 1), animate=False)
