"""The ``?`` help screen: keys and what the two views show."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

HELP_TEXT = """\
[b]swarmloco monitor[/b] — read-only view of a node and its swarm

[b]Keys[/b]
  [b]tab[/b]     switch between the node and the swarm view
  [b]?[/b]       this help (esc or ? closes it)
  [b]q[/b]       quit (the node keeps training)

[b]Node view[/b]  loss over outer steps, progress through the
  round's inner steps, where the last round's time went
  (compute / matchmaking / all-reduce / outer step),
  traffic, memory and the node's event log.

[b]Swarm view[/b]  one row per peer heartbeat from the DHT;
  a peer silent for longer than the stale limit shows
  as [red]stale[/red]. Totals count live peers only.

A source that stops answering shows [reverse red] UNREACHABLE [/]
and the last data stays on screen."""


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

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(HELP_TEXT, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
