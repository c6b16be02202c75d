"""What the node sees of the network: the :class:`Transport` protocol, a round's handle and outcome.

The node (:mod:`swarmloco.node`) depends only on these; :class:`~swarmloco.protocol.transport.SwarmTransport`
implements them over hivemind, and an in-memory fake can stand in for it in tests. Nothing here imports
hivemind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class RoundOutcome:
    """What one averaging round produced. ``ok`` False means: discard the round, keep the global params."""

    ok: bool
    error: str | None = None
    gathered: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each group member's metadata (peer id -> what it passed as ``gather``), identical on all members."""
    bytes_sent: int = 0
    bytes_received: int = 0
    matchmaking_s: float = 0.0
    allreduce_s: float = 0.0
    suspects: tuple[str, ...] = ()
    """Peers known to have failed this round (dead reducers): a re-run leaves them out."""
    clipped: tuple[str, ...] = ()
    """Peers whose update norm this peer's reducer had to clip (far above the group's median)."""
    capped: tuple[str, ...] = ()
    """Peers whose claimed weight (samples) this peer's reducer had to cap."""
    rejected: tuple[str, ...] = ()
    """Peers that sent this peer invalid data (NaN/Inf, undecodable, wrong size or weight)."""
    slow: tuple[str, ...] = ()
    """Peers that timed out in this (failed) round."""
    decided: bool = False
    """The all-reduce finished but the group decided not to commit (no quorum, mixed states): every member
    reached the same verdict, so no member is left stuck inside this round."""

    @property
    def group_size(self) -> int:
        return len(self.gathered)


@dataclass(frozen=True)
class DownloadedState:
    """Another peer's state as it came off the wire: not yet checked (the node checks it)."""

    peer_id: str
    metadata: Any
    tensors: list[torch.Tensor]
    bytes: int
    seconds: float
    sources: tuple[str, ...] = ()
    """Every peer that sent a part of it (several when the download was sharded)."""


class RoundHandle(Protocol):
    def done(self) -> bool: ...

    def wait(self, timeout: float) -> bool:
        """Wait until the round ended, at most ``timeout`` seconds; whether it did."""

    def abort(self, reason: str) -> None:
        """Give the round up now (it fails at once with ``reason``); no-op once it ended."""

    def result(self) -> RoundOutcome:
        """Block until the round ends (bounded by the round's own deadlines); write results into outputs."""


class Transport(Protocol):
    """What the node needs from the network (implemented by SwarmTransport and tests' FakeTransport)."""

    peer_id: str

    def visible_maddrs(self) -> list[str]: ...

    def store(self, key: str, subkey: str, value: bytes, expiration_time: float) -> bool: ...

    def get(self, key: str) -> dict[str, bytes]: ...

    def start_round(self, tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], weight: float,
                    gather: dict[str, Any], scheduled_time: float, timeout: float,
                    expected_group_size: int | None = None, parts: Sequence[int] | None = None,
                    members: Sequence[str] | None = None, leader: str | None = None,
                    step: int = 0) -> RoundHandle:
        """Begin averaging ``tensors`` into ``outputs``. ``parts``: which of the run's parameters they are (a
        streaming fragment's, in order); None: all of them. ``members``: the peer ids expected in the group
        (the ready barrier's) and ``leader`` the one they agree to follow, without a DHT search. ``step``: the
        outer step the round is for (the codec encodes for it: :meth:`Codec.for_round`)."""

    def set_state_provider(self, provider: Callable[[], tuple[Any, list[torch.Tensor]]]) -> None: ...

    def set_gate(self, private: bool, admitted: frozenset[bytes], excluded: frozenset[str]) -> None:
        """Whom to refuse at matchmaking: excluded peer ids; if ``private``, every key not ``admitted``."""

    def download_state(self, peer_ids: Sequence[str], timeout: float, max_bytes: int,
                       parallel: int = 1) -> tuple[DownloadedState | None, list[str]]: ...

    def set_lineage(self, root_step: int, root_digest: bytes, start: int,
                    entries: Sequence[tuple[bytes, bytes]]) -> None:
        """The chain this peer serves as proof: entries (digest after, encoded certificate) from ``start``."""

    def fetch_lineage(self, peer_id: str, locator: Sequence[tuple[int, bytes]], timeout: float,
                      max_bytes: int) -> tuple[dict | None, str | None]:
        """Another peer's proof since the newest shared locator point: (``{"root", "from", "tip", "certs"}``,
        None), or (None, a one-line error)."""

    def dead(self) -> str | None:
        """Why this transport can take part in no round any more (a helper process died), else None."""

    def shutdown(self) -> None: ...


class TransportDied(RuntimeError):
    """A helper process of hivemind's (the averager, the DHT node) died under a running peer."""


__all__ = ["DownloadedState", "RoundHandle", "RoundOutcome", "Transport", "TransportDied"]
