"""The ``swarmloco monitor`` terminal UI: read-only views of a node and of its swarm."""

from swarmloco.tui.app import MonitorApp
from swarmloco.tui.sources import NodeSource, RecordedSource, SwarmSource, Unreachable

__all__ = ["MonitorApp", "NodeSource", "RecordedSource", "SwarmSource", "Unreachable"]
