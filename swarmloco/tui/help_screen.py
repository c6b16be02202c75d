"""The ``?`` help screen: keys and what the two views show."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

QUIT_NOTES = {
    None: "quit the monitor (the node keeps training)",
    "node": "quit, and stop the node (it leaves the swarm\n          and writes its checkpoint)",
    "demo": "quit, and stop the demo (all its peers)",
}

HELP_TEXT = """\
[b]swarmloco monitor[/b] — read-only view of a node and its swarm

[b]Keys[/b]
  [b]tab[/b]     switch between the node and the swarm view
  [b]?[/b]       this help (esc or ? closes it)
  [b]q[/b]       {quit}

[b]Node view[/b]  loss over outer steps (scale: top and bottom
  values, outer steps), progress through the round's inner
  steps, the last round's time from its start to the next:
  compute / wait (for peers) / averaging / other (outer
  step, eval), traffic (1 MB = 10^6 bytes), memory, events.

[b]Swarm view[/b]  one row per peer heartbeat from the DHT;
  a peer silent for longer than the stale limit shows
  as [red]stale[/red]. Totals count live peers only.

A source that stops answering shows [reverse red] UNREACHABLE [/]
and the last data stays on screen; a node that stopped shows
[reverse] STOPPED [/]; a view with no source says so."""


def help_text(attached: str | None = None) -> str:
    """The help, with what ``q`` does in this mode (a monitor started by ``run --tui`` or ``demo --tui``
    stops what it watches when it quits)."""
    return HELP_TEXT.format(quit=QUIT_NOTES.get(attached, QUIT_NOTES[None]))


class HelpScreen(ModalScreen[None]):
    """A centred box over the current view."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: 64; max-width: 100%; height: auto; max-height: 100%;
        border: round $accent; background: $panel; padding: 0 1;
    }
    HelpScreen Static { height: auto; }
    """

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("question_mark", "close", "Close", show=False),
        Binding("q", "close", "Close", show=False),
    ]

    def __init__(self, attached: str | None = None) -> None:
        super().__init__()
        self.attached = attached

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(help_text(self.attached), id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
