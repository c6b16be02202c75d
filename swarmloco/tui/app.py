"""``swarmloco monitor``: a read-only Textual view of one node and of the swarm around it.

The app never trains and never touches a node's internals: it polls a node source (the node's
local status endpoint) and a swarm source (peer heartbeats) about once a second from a worker
thread, so a slow or dead source never freezes the screen. A dead source shows UNREACHABLE and
the last data it gave stays on screen; a node that stopped shows STOPPED; a view with no source says
so (it is not a failure).

``attached``: the monitor was started by ``run --tui`` ("node") or ``demo --tui`` ("demo"), and
quitting it stops that too; the footer and the help say so. With ``handle_signals``, SIGINT, SIGTERM
and SIGHUP quit it like ``q`` (a second one exits at once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import ContentSwitcher, Footer, Header

from swarmloco.tui.help_screen import HelpScreen
from swarmloco.tui.node_view import NodeView
from swarmloco.tui.sources import SwarmSource, Unreachable
from swarmloco.tui.swarm_view import SwarmView

logger = logging.getLogger(__name__)

VIEWS = ("node", "swarm")


class StatusSource(Protocol):
    """Anything whose ``fetch()`` returns a node status dict (NodeSource, RecordedSource)."""

    def fetch(self) -> dict: ...


@dataclass
class Poll:
    """One poll of both sources; ``None`` data means 'no new data' (keep the last)."""

    status: dict | None = None
    node_ok: bool = True
    node_error: str | None = None
    peers: list[dict] | None = None
    swarm_ok: bool = True
    swarm_error: str | None = None
    now: float = 0.0


def _fetch(source: Any) -> tuple[Any, bool, str | None]:
    try:
        return source.fetch(), True, None
    except Unreachable as exc:
        return None, False, str(exc)
    except Exception as exc:  # a buggy source must not kill the monitor
        logger.debug("source %r failed", source, exc_info=True)
        return None, False, f"{type(exc).__name__}: {exc}"


def _label(source: Any, default: str) -> str:
    describe = getattr(source, "describe", None)
    return describe() if callable(describe) else default


class MonitorApp(App[None]):
    """Monitor a node (``node_source``) and/or the swarm (``swarm_source``); either may be None."""

    TITLE = "swarmloco monitor"
    CSS = "Screen { layout: vertical; } ContentSwitcher { height: 1fr; }"
    BINDINGS = [
        Binding("tab", "switch_view", "Switch view", priority=True),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]
    QUIT_LABELS = {None: "Quit", "node": "Quit & stop node", "demo": "Quit & stop demo"}

    def __init__(
        self,
        node_source: StatusSource | None = None,
        swarm_source: SwarmSource | None = None,
        *,
        refresh_interval: float = 1.0,
        stale_after: float = 10.0,
        clock: Callable[[], float] = time.time,
        initial_view: str | None = None,
        attached: str | None = None,
        handle_signals: bool = False,
    ) -> None:
        super().__init__()
        self.attached = attached
        self.handle_signals = handle_signals
        self._signalled = False
        self.bind("q", "quit", description=self.QUIT_LABELS.get(attached, "Quit"))
        self.node_source = node_source
        self.swarm_source = swarm_source
        self.refresh_interval = refresh_interval
        self.stale_after = stale_after
        self.clock = clock
        if initial_view is None:
            initial_view = "node" if node_source is not None or swarm_source is None else "swarm"
        if initial_view not in VIEWS:
            raise ValueError(f"initial_view must be one of {VIEWS}, not {initial_view!r}")
        self.initial_view = initial_view
        self._polling = False
        self.polls = 0  # completed polls, for tests and the curious

    def compose(self) -> ComposeResult:
        yield Header()
        with ContentSwitcher(initial=self.initial_view):
            yield NodeView(source_label=_label(self.node_source, "node"), id="node")
            yield SwarmView(stale_after=self.stale_after,
                            source_label=_label(self.swarm_source, "swarm"), id="swarm")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"{self.initial_view} view"
        if self.node_source is None:
            self.query_one(NodeView).show_no_source("no node source: start the monitor with --node PORT "
                                                    "to see one node")
        if self.swarm_source is None:
            self.query_one(SwarmView).show_no_source("no swarm source: start the monitor with --initial-peers "
                                                     "MADDR --run RUN to see the swarm")
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, self._on_signal)
        self.refresh_data()
        self.set_interval(self.refresh_interval, self.refresh_data)

    def _on_signal(self) -> None:
        if self._signalled:  # a second signal: now
            from swarmloco.protocol.processes import reap_helpers

            reap_helpers()
            os._exit(130)
        self._signalled = True
        self.exit()

    @property
    def current_view(self) -> str:
        return self.query_one(ContentSwitcher).current or self.initial_view

    def refresh_data(self) -> None:
        """Start a poll unless one is still running (a slow source must not pile up threads)."""
        if self._polling or (self.node_source is None and self.swarm_source is None):
            return
        self._polling = True
        self._poll()

    @work(thread=True, group="poll", exit_on_error=False)
    def _poll(self) -> None:
        result = Poll()
        try:
            if self.node_source is not None:
                result.status, result.node_ok, result.node_error = _fetch(self.node_source)
            if self.swarm_source is not None:
                result.peers, result.swarm_ok, result.swarm_error = _fetch(self.swarm_source)
            result.now = self.clock()
        finally:
            try:
                self.call_from_thread(self._apply, result)
            except RuntimeError:  # the app closed while we were fetching
                logger.debug("monitor closed during a poll")

    def _apply(self, result: Poll) -> None:
        self._polling = False
        self.polls += 1
        if self.node_source is not None:
            self.query_one(NodeView).show(result.status, reachable=result.node_ok,
                                          error=result.node_error)
            status = self.query_one(NodeView).status or {}
            run = status.get("run_id")
            self.title = f"swarmloco monitor · {run}" if run else "swarmloco monitor"
        if self.swarm_source is not None:
            self.query_one(SwarmView).show(result.peers, now=result.now or self.clock(),
                                           reachable=result.swarm_ok, error=result.swarm_error)

    def action_switch_view(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        switcher = self.query_one(ContentSwitcher)
        switcher.current = VIEWS[(VIEWS.index(self.current_view) + 1) % len(VIEWS)]
        self.sub_title = f"{switcher.current} view"

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.attached))
