"""The one adapter around hivemind: DHT, averager and their processes behind a small synchronous API.

Everything hivemind-specific (``DHT``, ``DecentralizedAverager``, ``MPFuture``, ``StepControl``,
PeerID objects) stays in this module, :mod:`swarmloco.protocol.allreduce` and
:mod:`swarmloco.protocol.allgather`. The node sees:

* :meth:`SwarmTransport.store` / :meth:`SwarmTransport.get`: bytes values under (key, subkey);
* :meth:`SwarmTransport.start_round`: begins averaging in the background and returns a
  :class:`RoundHandle`, so a round can run beside training (overlapped outer steps);
* :class:`RoundOutcome`: a failed round is a value with an ``error`` string, never an exception;
* :meth:`SwarmTransport.set_state_provider` / :meth:`SwarmTransport.download_state`: serve this
  peer's state to others and fetch another peer's (late join, restart, a peer that fell behind).

The node depends only on the :class:`Transport` protocol, so an in-memory fake can stand in for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from swarmloco.compression.base import Codec
from swarmloco.config import SwarmConfig

logger = logging.getLogger(__name__)


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
                    expected_group_size: int | None = None) -> RoundHandle: ...

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

    def shutdown(self) -> None: ...


class _HivemindRound:
    def __init__(self, transport: SwarmTransport, control, outputs: Sequence[torch.Tensor], started: float):
        self._transport, self._control, self._outputs, self._started = transport, control, outputs, started

    def done(self) -> bool:
        return self._control.done()

    def abort(self, reason: str) -> None:
        if not self._control.done():
            try:
                self._transport.averager.abort_round(reason)
            except Exception as e:  # noqa: BLE001 - the round then ends by its own timeouts
                logger.debug("could not abort the round: %s", e)

    def result(self) -> RoundOutcome:
        try:
            info = self._control.result()
        except BaseException as e:  # noqa: BLE001 - every failure of a round is a value
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            names = {attr: tuple(s for s in getattr(e, attr, ()) if isinstance(s, str))
                     for attr in ("suspects", "rejected", "slow")}
            return RoundOutcome(ok=False, error=reason, **names)
        if not isinstance(info, dict):
            return RoundOutcome(ok=False, error="averager returned no result")
        with self._transport.averager.get_tensors() as averaged:
            for out, avg in zip(self._outputs, averaged):
                out.copy_(avg)
        total = time.perf_counter() - self._started
        allreduce_s = float(info.get("allreduce_s", 0.0))
        return RoundOutcome(
            ok=True,
            gathered={k: v if isinstance(v, dict) else {} for k, v in info["gathered"].items()},
            bytes_sent=int(info.get("bytes_sent", 0)),
            bytes_received=int(info.get("bytes_received", 0)),
            matchmaking_s=max(0.0, total - allreduce_s),
            allreduce_s=allreduce_s,
            clipped=tuple(str(c) for c in info.get("clipped", ())),
            capped=tuple(str(c) for c in info.get("capped", ())),
            rejected=tuple(str(c) for c in info.get("rejected", ())),
        )


def start_dht(cfg: SwarmConfig, *, identity_path: str | None = None, record_validators: Sequence[Any] = (),
              client_mode: bool | None = None):
    """A started hivemind DHT node (and its p2pd) with this peer's libp2p settings and identity key."""
    import hivemind

    kwargs: dict[str, Any] = dict(
        initial_peers=list(cfg.initial_peers), host_maddrs=list(cfg.host_maddrs),
        client_mode=cfg.client_mode if client_mode is None else client_mode,
        use_relay=cfg.use_relay, use_auto_relay=cfg.use_auto_relay, record_validators=list(record_validators),
        start=True, startup_timeout=30,
    )
    if cfg.announce_maddrs:
        kwargs["announce_maddrs"] = list(cfg.announce_maddrs)
    if identity_path:  # hivemind's "identity taken?" probe only parses RSA keys: ours are Ed25519
        kwargs.update(identity_path=identity_path, check_if_identity_free=False)
    return hivemind.DHT(**kwargs)


class SwarmTransport:
    """A hivemind DHT node plus a :class:`SwarmAverager` for the run's pseudo-gradients."""

    def __init__(self, cfg: SwarmConfig, *, prefix: str, templates: Sequence[torch.Tensor], codec: Codec,
                 record_validators: Sequence[Any] = (), identity_path: str | None = None, clip_factor: float = 0.0,
                 dht: Any = None, own_dht: bool = True):
        """``dht``: an already started DHT node to use (``swarmloco join`` starts one to fetch the manifest
        before it knows the model; a :class:`~swarmloco.Swarm` holds one for its runs); it is shut down with
        this transport if ``own_dht``."""
        from swarmloco.protocol.allreduce import SwarmAverager

        self.cfg = cfg
        if dht is None:
            dht = start_dht(cfg, identity_path=identity_path, record_validators=record_validators)
        elif record_validators:
            dht.add_validators(list(record_validators))
        self.dht, self._own_dht, self._closed = dht, own_dht, False
        try:
            self.averager = SwarmAverager(
                [torch.zeros_like(t, dtype=torch.float32, device="cpu") for t in templates],
                self.dht,
                codec=codec,
                clip_factor=clip_factor,
                prefix=prefix,
                start=True,
                target_group_size=cfg.max_group_size,
                min_group_size=2,
                min_matchmaking_time=cfg.matchmaking_time,
                request_timeout=cfg.request_timeout,
                allreduce_timeout=cfg.allreduce_timeout,
                next_chunk_timeout=cfg.next_chunk_timeout,
                client_mode=cfg.client_mode,
                shutdown_timeout=5,
            )
        except BaseException:
            if own_dht:
                self.dht.shutdown()
            raise
        self.peer_id = self.dht.peer_id.to_base58()
        self._target_group_size = cfg.max_group_size

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def store(self, key: str, subkey: str, value: bytes, expiration_time: float) -> bool:
        try:
            return bool(self.dht.store(key, value, expiration_time, subkey=subkey))
        except Exception as e:  # noqa: BLE001 - a DHT hiccup is logged, not fatal
            logger.warning("DHT store of %s failed: %s", key, e)
            return False

    def get(self, key: str) -> dict[str, bytes]:
        """Latest values under a dictionary key, as {subkey: value bytes}; empty when none or on error."""
        try:
            found = self.dht.get(key, latest=True)
        except Exception as e:  # noqa: BLE001
            logger.warning("DHT get of %s failed: %s", key, e)
            return {}
        if found is None or not isinstance(found.value, dict):
            return {}
        out = {}
        for subkey, item in found.value.items():
            value = getattr(item, "value", None)
            if isinstance(subkey, str) and isinstance(value, bytes):
                out[subkey] = value
        return out

    def start_round(self, tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], weight: float,
                    gather: dict[str, Any], scheduled_time: float, timeout: float,
                    expected_group_size: int | None = None) -> RoundHandle:
        target = min(self.cfg.max_group_size, expected_group_size or self.cfg.max_group_size)
        if target != self._target_group_size:
            try:
                self.averager.set_target_group_size(max(2, target))
                self._target_group_size = target
            except Exception as e:  # noqa: BLE001 - the round then waits for scheduled_time instead
                logger.warning("could not set the target group size: %s", e)
        with self.averager.get_tensors() as buffers:
            for buf, t in zip(buffers, tensors):
                buf.copy_(t)
        started = time.perf_counter()
        control = self.averager.step(
            gather=gather, weight=float(weight), scheduled_time=scheduled_time, timeout=timeout,
            allow_retries=False, wait=False,
        )
        return _HivemindRound(self, control, outputs, started)

    def set_state_provider(self, provider: Callable[[], tuple[Any, list[torch.Tensor]]]) -> None:
        """``provider()`` -> (msgpack-able metadata, tensors): what a peer downloading our state receives."""
        self.averager.state_provider = provider

    def set_gate(self, private: bool, admitted: frozenset[bytes], excluded: frozenset[str]) -> None:
        try:
            self.averager.set_gate(private, admitted, excluded)
        except Exception as e:  # noqa: BLE001 - the previous gate stays; the next refresh tries again
            logger.warning("could not update the matchmaking gate: %s", e)

    def download_state(self, peer_ids: Sequence[str], timeout: float, max_bytes: int,
                       parallel: int = 1) -> tuple[DownloadedState | None, list[str]]:
        """Fetch a state: a shard from each of up to ``parallel`` of ``peer_ids`` at once, else the whole
        state from the first of them that serves one; (None, errors) if none did."""
        try:
            got = self.averager.download_state(peer_ids, timeout=timeout, max_bytes=max_bytes, parallel=parallel)
        except Exception as e:  # noqa: BLE001
            return None, [f"{type(e).__name__}: {e}"]
        if "metadata" not in got:
            return None, list(got.get("errors", []))
        return DownloadedState(got["peer"], got["metadata"], list(got["tensors"]), int(got["bytes"]),
                               float(got["seconds"]), tuple(got.get("sources", [got["peer"]]))), \
            list(got.get("errors", []))

    def set_lineage(self, root_step: int, root_digest: bytes, start: int,
                    entries: Sequence[tuple[bytes, bytes]]) -> None:
        try:
            self.averager.set_lineage(root_step, root_digest, start, list(entries))
        except Exception as e:  # noqa: BLE001 - peers asking for proof get the previous chain meanwhile
            logger.warning("could not hand the lineage to the averager: %s", e)

    def fetch_lineage(self, peer_id: str, locator: Sequence[tuple[int, bytes]], timeout: float,
                      max_bytes: int) -> tuple[dict | None, str | None]:
        try:
            return self.averager.fetch_lineage(peer_id, list(locator), timeout=timeout, max_bytes=max_bytes), None
        except Exception as e:  # noqa: BLE001 - a dead, refusing or lying peer: the caller decides
            return None, (str(e) or type(e).__name__)[:300]

    def shutdown(self) -> None:
        """Stop the averager and DHT processes (and p2pd); kill whichever does not stop in time.

        First let the averager finish sending group mates the averaged parts it owes them (bounded by
        ``next_chunk_timeout``), so that leaving right after a round does not fail the others' round.
        A DHT node this transport does not own stays up (its swarm stops it)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.averager.drain(self.cfg.next_chunk_timeout):
                logger.warning("left with averaged parts still owed to group mates")
        except Exception as e:  # noqa: BLE001
            logger.debug("drain before shutdown failed: %s", e)
        for part, proc in (("averager", self.averager), ("dht", self.dht))[:2 if self._own_dht else 1]:
            try:
                proc.shutdown()
            except Exception as e:  # noqa: BLE001
                logger.warning("shutting down the %s failed: %s", part, e)
            if proc.is_alive():
                logger.warning("the %s process did not stop in time; killing it", part)
                proc.kill()
                proc.join(5)


class DhtClient:
    """A DHT-only hivemind node (no averager): for the monitor (client mode) and bootstrap peers."""

    def __init__(self, cfg: SwarmConfig, *, identity_path: str | None = None, record_validators: Sequence[Any] = ()):
        self.dht = start_dht(cfg, identity_path=identity_path, record_validators=record_validators)
        self.peer_id = self.dht.peer_id.to_base58()

    def add_validators(self, validators: Sequence[Any]) -> None:
        self.dht.add_validators(list(validators))

    def detach_dht(self) -> Any:
        """Hand the started DHT node over (to a SwarmTransport); this client no longer owns it."""
        dht, self.dht = self.dht, None
        return dht

    visible_maddrs = SwarmTransport.visible_maddrs
    store = SwarmTransport.store
    get = SwarmTransport.get

    def shutdown(self) -> None:
        if self.dht is None:
            return
        try:
            self.dht.shutdown()
        except Exception as e:  # noqa: BLE001
            logger.warning("shutting down the dht failed: %s", e)
        if self.dht.is_alive():
            self.dht.kill()
            self.dht.join(5)


def route_hivemind_logs() -> None:
    """Send hivemind's log records through the root logger (ours) instead of its own handler."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
