"""The single-node view: losses, round progress, where the round's time went, traffic, events.

Round time is the one definition of :mod:`swarmloco.display` (a round's start to the next, split
into compute / wait / averaging / other); bytes are SI; peer ids are their last 8 characters.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import ProgressBar, RichLog, Sparkline, Static

from swarmloco.display import round_parts
from swarmloco.tui import fmt

PHASES = (  # part of a round (display.round_parts), legend label, bar colour
    ("compute", "compute", "green"),
    ("wait", "wait", "yellow"),
    ("averaging", "averaging", "magenta"),
    ("other", "other", "cyan"),
)
EVENT_STYLES = {"peer_joined": "green", "peer_left": "yellow", "round_failed": "bold red",
                "checkpoint": "cyan", "state_downloaded": "blue", "info": "dim",
                "contribution_clipped": "magenta", "peer_excluded": "bold magenta", "round_retry": "yellow",
                "clock": "bold red"}
SPLIT_BAR_WIDTH = 24


def _series(history: Any, key: str) -> list[float]:
    if not isinstance(history, list):
        return []
    values = (fmt.number(h.get(key)) for h in history if isinstance(h, dict))
    return [v for v in values if v is not None]


def round_time(s: dict) -> float | None:
    """The last round's wall time: the node's ``last_round_time``, else its history's, else the parts' sum."""
    last = s.get("last_round") if isinstance(s.get("last_round"), dict) else {}
    t = fmt.number(s.get("last_round_time"))
    if t is None and isinstance(s.get("history"), list):
        t = next((fmt.number(h.get("round_time")) for h in reversed(s["history"]) if isinstance(h, dict)
                  and h.get("outer_step") == last.get("outer_step")), None)
    if t is None:
        t = sum(fmt.number(last.get(k)) or 0.0 for k in ("compute_s", "barrier_s", "matchmaking_s", "allreduce_s",
                                                        "outer_step_s"))
    return t


def split_bar(parts: dict[str, float], width: int = SPLIT_BAR_WIDTH) -> Text:
    """A bar of ``width`` cells, coloured by each part's share of the round."""
    times = [(fmt.number(parts.get(key)) or 0.0, colour) for key, _, colour in PHASES]
    total = sum(t for t, _ in times)
    bar = Text()
    if total <= 0:
        return bar.append("░" * width, style="dim")
    used = 0
    for i, (t, colour) in enumerate(times):
        cells = width - used if i == len(times) - 1 else round(width * t / total)
        cells = max(0, min(cells, width - used))
        if t > 0 and cells == 0 and used < width:
            cells = 1  # a phase that took any time gets at least one cell
        bar.append("█" * cells, style=colour)
        used += cells
    return bar


class NodeView(Vertical):
    """Shows one node's status dict; ``show()`` is the only way data gets in."""

    DEFAULT_CSS = """
    NodeView { height: 1fr; padding: 0 1; }
    NodeView #node-header { height: 1; }
    NodeView .loss-row { height: 1fr; min-height: 2; max-height: 5; }
    NodeView .loss-label { width: 26; }
    NodeView Sparkline { width: 1fr; height: 1fr; }
    NodeView #node-progress-row { height: 1; }
    NodeView #node-progress-label { width: 26; }
    NodeView ProgressBar { width: 1fr; }
    NodeView ProgressBar Bar { width: 1fr; }
    NodeView #node-round { height: 2; }
    NodeView #node-traffic, NodeView #node-device { height: 1; }
    NodeView #node-events { height: 2fr; min-height: 4; border: round $primary-darken-2;
                            border-title-color: $text-muted; }
    """

    def __init__(self, source_label: str = "node", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source_label = source_label
        self.status: dict | None = None
        self.reachable = True
        self._seen_events: set[tuple] = set()

    def compose(self) -> ComposeResult:
        yield Static("waiting for the node…", id="node-header")
        with Horizontal(classes="loss-row"):
            yield Static("train loss", id="train-label", classes="loss-label")
            yield Sparkline([], id="train-spark")
        with Horizontal(classes="loss-row"):
            yield Static("eval loss", id="eval-label", classes="loss-label")
            yield Sparkline([], id="eval-spark")
        with Horizontal(id="node-progress-row"):
            yield Static("round", id="node-progress-label")
            yield ProgressBar(total=None, show_eta=False, id="node-progress")
        yield Static("", id="node-round")
        yield Static("", id="node-traffic")
        yield Static("", id="node-device")
        log = RichLog(id="node-events", max_lines=500, wrap=True, markup=False)
        log.border_title = "events"
        yield log

    def show_no_source(self, message: str) -> None:
        """This monitor watches no node (not a failure: nothing to reach)."""
        self.query_one("#node-header", Static).update(Text(message, style="dim"))
        self.query_one("#node-round", Static).update(Text(""))

    @property
    def stopped(self) -> bool:
        """The node said it stopped (finished, or asked to), so a dead endpoint is no surprise."""
        return bool(self.status) and self.status.get("state") == "stopped"

    def show(self, status: dict | None, *, reachable: bool, error: str | None = None) -> None:
        """Render ``status`` (None: keep the last one); ``reachable`` False marks it stale."""
        log = self.query_one("#node-events", RichLog)
        if reachable != self.reachable:
            if reachable:
                msg, style = "node reachable again", "green"
            elif self.stopped:
                msg, style = "the node has stopped", "bold"
            else:
                msg, style = f"node unreachable: {error or ''}", "bold red"
            log.write(Text(msg, style=style))
        self.reachable = reachable
        if status is not None:
            self.status = status
        self._render_header(error)
        if self.status is None:
            return
        s = self.status
        self._render_losses(s)
        self._render_progress(s)
        self._render_round(s)
        self._render_traffic(s)
        self._render_events(s.get("events"), log)

    def _render_header(self, error: str | None) -> None:
        header = Text()
        if not self.reachable and self.stopped:
            header.append(" STOPPED ", style="bold black on white")
            header.append(" the node has stopped; its last state ", style="dim")
        elif not self.reachable:
            header.append(" UNREACHABLE ", style="bold white on red")
            header.append(f" {self.source_label} ")
            header.append("showing last data" if self.status else "waiting for data",
                          style="dim")
        elif self.status is None:
            header.append(f"waiting for {self.source_label}…", style="dim")
        if self.status is not None:
            s = self.status
            state = str(s.get("state") or "?")
            if self.reachable:
                header.append(f" {state} ", style="bold black on green"
                              if state in ("training", "averaging") else "bold black on yellow")
            header.append(f" peer {fmt.short_peer_id(s.get('peer_id'))}", style="bold")
            header.append(f"  run {s.get('run_id') or fmt.DASH}")
            header.append(f"  step {fmt.integer(s.get('outer_step'))}", style="bold")
            header.append(f"  {fmt.num(s.get('samples_per_second'), 1)} samples/s")
        self.query_one("#node-header", Static).update(header)

    def _render_losses(self, s: dict) -> None:
        history = s.get("history")
        steps = [int(v) for h in history if isinstance(h, dict) and (v := fmt.number(h.get("outer_step"))) is not None] \
            if isinstance(history, list) else []
        for key, name in (("train_loss", "train"), ("eval_loss", "eval")):
            series = _series(history, key)
            label = Text(f"{name:<5} ", style="bold")
            label.append(fmt.num(s.get(key), 3))
            if series:  # the chart's scale: its top and bottom values, and the outer steps it spans
                label.append(f"\n▀ {max(series):.3f} top", style="dim")
                label.append(f"\n▄ {min(series):.3f} bottom", style="dim")
                if steps:
                    label.append(f", steps {min(steps)}–{max(steps)}", style="dim")
            self.query_one(f"#{name}-label", Static).update(label)
            self.query_one(f"#{name}-spark", Sparkline).data = series

    def _render_progress(self, s: dict) -> None:
        inner, total = fmt.number(s.get("inner_step")), fmt.number(s.get("inner_steps_per_round"))
        bar = self.query_one("#node-progress", ProgressBar)
        if total and total > 0:
            bar.update(total=total, progress=min(inner or 0.0, total))
        else:
            bar.update(total=None)
        label = f"round progress {fmt.integer(inner)}/{fmt.integer(total)}"
        self.query_one("#node-progress-label", Static).update(label)

    def _render_round(self, s: dict) -> None:
        last = s.get("last_round")
        widget = self.query_one("#node-round", Static)
        if not isinstance(last, dict):
            widget.update(Text("no round finished yet", style="dim"))
            return
        total = round_time(s)
        parts = round_parts(last, total)
        line = Text(f"last round {fmt.integer(last.get('outer_step'))} ")
        ok = last.get("ok")
        line.append("ok" if ok else "FAILED", style="green" if ok else "bold red")
        line.append(f" {fmt.integer(last.get('peers'))} peers, round time {fmt.seconds(total)} ")
        line.append_text(split_bar(parts))
        legend = Text()
        for key, label, colour in PHASES:
            legend.append("■ ", style=colour)
            legend.append(f"{label} {fmt.seconds(parts.get(key))}  ")
        if last.get("error"):
            legend.append(str(last["error"])[:60], style="red")
        widget.update(Text("\n").join([line, legend]))

    def _render_traffic(self, s: dict) -> None:
        last = s.get("last_round") if isinstance(s.get("last_round"), dict) else {}
        traffic = Text("traffic ", style="bold")
        traffic.append(f"↑{fmt.human_bytes(s.get('bytes_sent_total'))} "
                       f"↓{fmt.human_bytes(s.get('bytes_received_total'))}")
        traffic.append(f"  last ↑{fmt.human_bytes(last.get('bytes_sent'))} "
                       f"↓{fmt.human_bytes(last.get('bytes_received'))}")
        traffic.append(f"  ×{fmt.num(last.get('compression_ratio'), 1)} compression", style="dim")
        self.query_one("#node-traffic", Static).update(traffic)
        device = Text("device ", style="bold")
        device.append(f"{s.get('device') or fmt.DASH}  rss {fmt.human_bytes(s.get('rss_bytes'))}")
        if s.get("cuda_allocated_bytes") is not None:
            device.append(f"  cuda {fmt.human_bytes(s.get('cuda_allocated_bytes'))}")
        device.append(f"  rounds ok {fmt.integer(s.get('rounds_ok'))}"
                      f" failed {fmt.integer(s.get('rounds_failed'))}")
        device.append(f"  peers {fmt.integer(s.get('peers_online'))}")
        offset = fmt.number(s.get("clock_offset_s"))
        if offset is not None and s.get("clock_off") is True:  # (the node's log and events say what to do)
            device.append(f"  clock {abs(offset):.0f}s {'behind' if offset > 0 else 'ahead'}", style="bold red")
        self.query_one("#node-device", Static).update(device)

    def _render_events(self, events: Any, log: RichLog) -> None:
        if not isinstance(events, list):
            return
        current = set()
        for event in events:
            if not isinstance(event, dict):
                continue
            key = (event.get("time"), event.get("kind"), event.get("message"))
            current.add(key)
            if key in self._seen_events:
                continue
            kind = str(event.get("kind") or "info")
            line = Text(fmt.clock_time(event.get("time")) + " ", style="dim")
            line.append(f"{kind:<16} ", style=EVENT_STYLES.get(kind, ""))
            line.append(str(event.get("message") or ""))
            log.write(line)
        # Forget keys the node has dropped from its ring buffer, keep the ones still shown.
        keep = self._seen_events if len(self._seen_events) < 2000 else set()
        self._seen_events = current | keep
