"""The sections local to one peer: its networking (``[swarm]``), checkpoints (``[checkpoint]``) and status
endpoint (``[status]``). They are not part of the run manifest, so the peers of one swarm may differ in them.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarmloco.checks import check, check_bool, check_non_negative, check_positive, is_int
from swarmloco.maddrs import maddr_problem

__all__ = ["SwarmConfig", "CheckpointConfig", "StatusConfig"]


@dataclass(frozen=True, kw_only=True)
class SwarmConfig:
    """Networking of this peer (local: not part of the manifest)."""

    initial_peers: tuple[str, ...] = ()
    """Multiaddrs of any live peers of the swarm; empty starts a new swarm."""
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    """Multiaddrs to listen on (port 0 picks a free one)."""
    announce_maddrs: tuple[str, ...] = ()
    """Public multiaddrs to announce instead of the listening ones (behind port forwarding)."""
    client_mode: bool = False
    """Behind NAT with no port forwarding: make only outgoing connections."""
    use_relay: bool = True
    """Let libp2p relays carry traffic to and from peers behind NAT."""
    use_auto_relay: bool = False
    """Find and use relays automatically (libp2p AutoRelay)."""
    min_peers: int = 1
    """Wait for at least this many ready peers before the first round (up to ready_timeout)."""
    ready_timeout: float = 30.0
    """Seconds to wait for the expected peers to be ready for a round before averaging with those that are."""
    max_group_size: int = 64
    """Largest all-reduce group."""
    matchmaking_time: float = 2.0
    """Seconds a group leader waits for followers after the ready barrier (a full group starts at once; a
    re-run waits 2x, 3x, up to 4x as long)."""
    request_timeout: float = 1.5
    """Seconds to wait for one matchmaking RPC (keep it below matchmaking_time, as hivemind asks)."""
    allreduce_timeout: float = 60.0
    """Whole all-reduce deadline, seconds."""
    next_chunk_timeout: float = 10.0
    """A peer that sends no chunk for this many seconds is dropped from the all-reduce."""
    heartbeat_period: float = 2.0
    """Seconds between progress heartbeats in the DHT."""
    heartbeat_ttl: float = 10.0
    """A peer whose last heartbeat is older than this is considered gone."""
    identity_path: str = ""
    """Ed25519 identity file; empty makes a fresh identity each start."""
    round_retries: int = 2
    """Times a failed round (a peer died mid-all-reduce) is re-run at once among the survivors."""
    retry_grace: float = 1.0
    """Seconds a re-run waits for round members that have not reported the failure yet."""
    state_timeout: float = 30.0
    """A peer serving its state that sends nothing for this many seconds is dropped for the next one."""
    download_sources: int = 4
    """A peer catching up downloads a shard of the state from each of up to this many peers at once."""
    exclude_rounds: int = 10
    """A peer that sent an invalid contribution (NaN/Inf, undecodable, wrong size or weight), whose update was
    clipped in two rounds in a row, or that alone timed out in two failed attempts in a row, is refused at
    matchmaking for this many outer steps. 0: never."""
    bootstrap_timeout: float = 120.0
    """Seconds a start keeps trying again, with backoff, while none of initial_peers answers (a bootstrap peer
    still starting or busy with other newcomers); then it gives up with exit code 1. 0: one try."""

    def __post_init__(self) -> None:
        for name, kind in (("initial_peers", "dial"), ("host_maddrs", "listen"), ("announce_maddrs", "")):
            value = getattr(self, name)
            check(isinstance(value, tuple) and all(isinstance(v, str) for v in value), f"swarm.{name}", value,
                  "must be a list of multiaddr strings like \"/ip4/203.0.113.5/tcp/31337\"")
            for text in value:
                why = maddr_problem(text, listen=kind == "listen", dial=kind == "dial")
                check(why is None, f"swarm.{name}", text, f"not a usable multiaddr: {why}")
        check(len(self.host_maddrs) > 0 or self.client_mode, "swarm.host_maddrs", self.host_maddrs,
              "needs at least one address to listen on (or client_mode = true)")
        for name in ("client_mode", "use_relay", "use_auto_relay"):
            check_bool(f"swarm.{name}", getattr(self, name))
        check(isinstance(self.identity_path, str), "swarm.identity_path", self.identity_path, "must be a string")
        check(is_int(self.min_peers) and self.min_peers >= 1, "swarm.min_peers", self.min_peers,
              "must be an integer >= 1")
        check(is_int(self.max_group_size) and self.max_group_size >= 2, "swarm.max_group_size",
              self.max_group_size, "must be an integer >= 2")
        check(is_int(self.round_retries) and self.round_retries >= 0, "swarm.round_retries",
              self.round_retries, "must be an integer >= 0")
        check_non_negative("swarm.retry_grace", self.retry_grace)
        check_non_negative("swarm.bootstrap_timeout", self.bootstrap_timeout)
        check(is_int(self.exclude_rounds) and self.exclude_rounds >= 0, "swarm.exclude_rounds",
              self.exclude_rounds, "must be an integer >= 0")
        check(is_int(self.download_sources) and 1 <= self.download_sources <= 64, "swarm.download_sources",
              self.download_sources, "must be an integer from 1 to 64")
        for name in ("ready_timeout", "matchmaking_time", "request_timeout", "allreduce_timeout",
                     "next_chunk_timeout", "heartbeat_period", "heartbeat_ttl", "state_timeout"):
            check_positive(f"swarm.{name}", getattr(self, name))
        check(self.heartbeat_ttl > self.heartbeat_period, "swarm.heartbeat_ttl", self.heartbeat_ttl,
              "must exceed heartbeat_period")
        check(self.allreduce_timeout > self.next_chunk_timeout, "swarm.allreduce_timeout",
              self.allreduce_timeout, "must exceed next_chunk_timeout")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Local checkpoints (atomic: temp file + rename)."""

    dir: str = ""
    """Directory for checkpoints; empty disables them."""
    every: int = 1
    """Write a checkpoint every this many outer steps (and on exit)."""
    keep: int = 2
    """Checkpoints kept on disk."""

    def __post_init__(self) -> None:
        check(isinstance(self.dir, str), "checkpoint.dir", self.dir, "must be a string")
        check(is_int(self.every) and self.every >= 1, "checkpoint.every", self.every, "must be an integer >= 1")
        check(is_int(self.keep) and self.keep >= 1, "checkpoint.keep", self.keep, "must be an integer >= 1")


@dataclass(frozen=True, kw_only=True)
class StatusConfig:
    """The node's local status endpoint (JSON and Prometheus), bound to 127.0.0.1 only."""

    port: int = 0
    """TCP port on 127.0.0.1; 0 disables the endpoint."""

    def __post_init__(self) -> None:
        check(is_int(self.port) and 0 <= self.port < 65536, "status.port", self.port,
              "must be an integer from 0 (off) to 65535")
