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

The node depends only on the :class:`~swarmloco.protocol.interface.Transport` protocol (with the round's
handle and outcome, in :mod:`swarmloco.protocol.interface`), so an in-memory fake can stand in for it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Sequence

import torch

from swarmloco.compression.base import Codec
from swarmloco.config import SwarmConfig
from swarmloco.protocol.bootstrap import start_with_retries
from swarmloco.protocol.interface import DownloadedState, RoundHandle, RoundOutcome
from swarmloco.protocol.processes import isolated_helpers, reap_helpers, track
from swarmloco.protocol.rejoin import Rejoiner

logger = logging.getLogger(__name__)

DHT_CALL_TIMEOUT = 30.0
"""Longest wait for one DHT store or get: a DHT process that died (or a p2pd killed under it) must not
block the peer forever, least of all in the last heartbeat of a clean stop."""
STOP_ROUND_GRACE = 5.0
"""A peer told to stop while a round is in flight waits this long for it to finish (its group mates
then need no re-run), then leaves it: the others re-run it without this peer, as if it had died."""


class _LeftRound(Exception):
    """This peer stopped and left the round before it finished."""


class _HivemindRound:
    def __init__(self, transport: SwarmTransport, control, outputs: Sequence[torch.Tensor], started: float,
                 parts: Sequence[int] | None = None):
        self._transport, self._control, self._outputs, self._started = transport, control, outputs, started
        self._parts = parts

    def _wait(self) -> Any:
        """The round's result; gives up ``STOP_ROUND_GRACE`` after the transport was told to stop."""
        stopping, stop_seen = self._transport.stopping, None
        while True:
            try:
                return self._control.result(timeout=0.25)
            except TimeoutError:
                if self._control.done():  # the round's own failure, raised as a timeout
                    return self._control.result()
            if stopping is not None and stopping.is_set():
                stop_seen = stop_seen or time.monotonic()
                if time.monotonic() - stop_seen >= STOP_ROUND_GRACE:
                    self.abort("this peer is stopping")  # (its group mates learn it at once)
                    self._control.cancel()
                    self._transport.left_a_round = True
                    raise _LeftRound("left the round: this peer is stopping")

    def done(self) -> bool:
        return self._control.done()

    def wait(self, timeout: float) -> bool:
        try:
            self._control.result(timeout=timeout)
        except TimeoutError:
            return self._control.done()
        except BaseException:  # noqa: BLE001 - ended (in failure): result() says how
            return True
        return True

    def abort(self, reason: str) -> None:
        if not self._control.done():
            try:
                self._transport.averager.abort_round(reason)
            except Exception as e:  # noqa: BLE001 - the round then ends by its own timeouts
                logger.debug("could not abort the round: %s", e)

    def result(self) -> RoundOutcome:
        try:
            info = self._wait()
        except BaseException as e:  # noqa: BLE001 - every failure of a round is a value
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            names = {attr: tuple(s for s in getattr(e, attr, ()) if isinstance(s, str))
                     for attr in ("suspects", "rejected", "slow")}
            return RoundOutcome(ok=False, error=reason, **names)
        if not isinstance(info, dict):
            return RoundOutcome(ok=False, error="averager returned no result")
        with self._transport.averager.get_tensors() as averaged:
            for out, avg in zip(self._outputs, averaged if self._parts is None else [averaged[i] for i in self._parts]):
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


@contextlib.contextmanager
def _sigint_kept():
    """hivemind's averager sets SIGINT to "ignore" in the process that starts it: keep the caller's handler."""
    try:
        old = signal.getsignal(signal.SIGINT)
    except ValueError:
        old = None
    try:
        yield
    finally:
        if old is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, old)


def start_dht(cfg: SwarmConfig, *, identity_path: str | None = None, record_validators: Sequence[Any] = (),
              client_mode: bool | None = None, stop: threading.Event | None = None):
    """A started hivemind DHT node (and its p2pd) with this peer's libp2p settings and identity key; its
    processes lead their own process group (see :mod:`swarmloco.protocol.processes`). While none of the
    initial peers answers, the start is tried again for up to ``swarm.bootstrap_timeout`` seconds
    (:mod:`swarmloco.protocol.bootstrap`; ``stop`` ends the wait)."""
    from swarmloco.protocol import faults

    faults.refuse_dht()  # (tests: proves a bad input never got this far)
    return start_with_retries(lambda: _start_dht_once(cfg, identity_path, record_validators, client_mode),
                              initial_peers=cfg.initial_peers, timeout=cfg.bootstrap_timeout, stop=stop)


def _start_dht_once(cfg: SwarmConfig, identity_path: str | None, record_validators: Sequence[Any],
                    client_mode: bool | None):
    import hivemind

    kwargs: dict[str, Any] = dict(
        initial_peers=list(cfg.initial_peers), host_maddrs=list(cfg.host_maddrs),
        client_mode=cfg.client_mode if client_mode is None else client_mode,
        use_relay=cfg.use_relay, use_auto_relay=cfg.use_auto_relay, record_validators=list(record_validators),
        start=False, startup_timeout=30,
    )
    if cfg.announce_maddrs:
        kwargs["announce_maddrs"] = list(cfg.announce_maddrs)
    if identity_path:  # hivemind's "identity taken?" probe only parses RSA keys: ours are Ed25519
        kwargs.update(identity_path=identity_path, check_if_identity_free=False)
    dht = hivemind.DHT(**kwargs)
    try:
        with isolated_helpers(), _sigint_kept():
            dht.run_in_background(await_ready=False)
        track([dht.pid])
        dht.wait_until_ready(timeout=60)
    except BaseException:
        # a DHT process that reported its error exits by itself: killed meanwhile, it could leave hivemind's
        # process-shared MPFuture lock held, and the next start in this process would never hear back
        dht.join(5)
        if dht.is_alive():
            dht.kill()
            dht.join(5)
        reap_helpers([dht.pid] if dht.pid else [])  # its p2pd, if it got that far
        raise
    return dht


class SwarmTransport:
    """A hivemind DHT node plus a :class:`SwarmAverager` for the run's pseudo-gradients."""

    def __init__(self, cfg: SwarmConfig, *, prefix: str, templates: Sequence[torch.Tensor], codec: Codec,
                 record_validators: Sequence[Any] = (), identity_path: str | None = None, clip_factor: float = 0.0,
                 dht: Any = None, own_dht: bool = True, stopping: threading.Event | None = None):
        """``dht``: an already started DHT node to use (``swarmloco join`` starts one to fetch the manifest
        before it knows the model; a :class:`~swarmloco.Swarm` holds one for its runs); it is shut down with
        this transport if ``own_dht``. ``stopping``: set when the peer is told to stop (a round in flight is
        then left after ``STOP_ROUND_GRACE``)."""
        from swarmloco.protocol.allreduce import SwarmAverager

        self.cfg, self.stopping = cfg, stopping
        self.left_a_round = False  # a round left unfinished on a stop: nothing to drain for its group
        if dht is None:
            dht = start_dht(cfg, identity_path=identity_path, record_validators=record_validators, stop=stopping)
        elif record_validators:
            dht.add_validators(list(record_validators))
        self.dht, self._own_dht, self._closed = dht, own_dht, False
        self._rejoiner = Rejoiner(dht, cfg.initial_peers)  # back into the DHT after a freeze (see its module)
        try:
            with isolated_helpers(), _sigint_kept():
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
            track([self.averager.pid])
        except BaseException:
            if own_dht:
                self.dht.shutdown()
                reap_helpers([self.dht.pid])
            raise
        self.peer_id = self.dht.peer_id.to_base58()
        self._target_group_size = cfg.max_group_size

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def store(self, key: str, subkey: str, value: bytes, expiration_time: float) -> bool:
        try:
            future = self.dht.store(key, value, expiration_time, subkey=subkey, return_future=True)
            return bool(future.result(timeout=DHT_CALL_TIMEOUT))
        except Exception as e:  # noqa: BLE001 - a DHT hiccup is logged, not fatal
            logger.warning("DHT store of %s failed: %s", key, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            return False

    def get(self, key: str) -> dict[str, bytes]:
        """Latest values under a dictionary key, as {subkey: value bytes}; empty when none or on error.
        (Every few seconds it also checks, without waiting, that this node is still in the DHT.)"""
        self._rejoiner.poll()
        try:
            found = self.dht.get(key, latest=True, return_future=True).result(timeout=DHT_CALL_TIMEOUT)
        except Exception as e:  # noqa: BLE001
            logger.warning("DHT get of %s failed: %s", key, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
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
                    expected_group_size: int | None = None, parts: Sequence[int] | None = None,
                    members: Sequence[str] | None = None, leader: str | None = None,
                    step: int = 0) -> RoundHandle:
        target = min(self.cfg.max_group_size, expected_group_size or self.cfg.max_group_size)
        if target != self._target_group_size:
            try:
                self.averager.set_target_group_size(max(2, target))
                self._target_group_size = target
            except Exception as e:  # noqa: BLE001 - the round then waits for scheduled_time instead
                logger.warning("could not set the target group size: %s", e)
        with self.averager.get_tensors() as buffers:
            for buf, t in zip(buffers if parts is None else [buffers[i] for i in parts], tensors):
                buf.copy_(t)
        started = time.perf_counter()
        control = self.averager.step(
            gather=gather, weight=float(weight), scheduled_time=scheduled_time, timeout=timeout,
            allow_retries=False, wait=False, parts=parts, members=members, leader=leader, round_step=step,
        )
        return _HivemindRound(self, control, outputs, started, parts)

    def set_state_provider(self, provider: Callable[[], tuple[Any, list[torch.Tensor]]]) -> None:
        """``provider()`` -> (msgpack-able metadata, tensors): what a peer downloading our state receives."""
        self.averager.state_provider = provider

    def set_gate(self, private: bool, admitted: frozenset[bytes], excluded: frozenset[str]) -> None:
        try:
            self.averager.set_gate(private, admitted, excluded)
        except Exception as e:  # noqa: BLE001 - the previous gate stays; the next refresh tries again
            logger.warning("could not update the matchmaking gate: %s", str(e) or type(e).__name__)

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
            logger.warning("could not hand the lineage to the averager: %s", str(e) or type(e).__name__)

    def fetch_lineage(self, peer_id: str, locator: Sequence[tuple[int, bytes]], timeout: float,
                      max_bytes: int) -> tuple[dict | None, str | None]:
        try:
            return self.averager.fetch_lineage(peer_id, list(locator), timeout=timeout, max_bytes=max_bytes), None
        except Exception as e:  # noqa: BLE001 - a dead, refusing or lying peer: the caller decides
            return None, (str(e) or type(e).__name__)[:300]

    def dead(self) -> str | None:
        if self._closed:
            return None
        for part, proc in (("averager", self.averager), ("DHT node", self.dht)):
            if not proc.is_alive():
                return f"hivemind's {part} process died (exit code {proc.exitcode})"
        return None

    def shutdown(self) -> None:
        """Stop the averager and DHT processes (and p2pd); kill whichever does not stop in time, then
        whatever is left of their process groups.

        First let the averager finish sending group mates the averaged parts it owes them (bounded by
        ``next_chunk_timeout``), so that leaving right after a round does not fail the others' round.
        A DHT node this transport does not own stays up (its swarm stops it)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.left_a_round and self.averager.is_alive() and \
                    not self.averager.drain(self.cfg.next_chunk_timeout):
                logger.info("left with averaged parts still owed to group mates")
        except Exception as e:  # noqa: BLE001
            logger.debug("drain before shutdown failed: %s", e)
        for part, proc in (("averager", self.averager), ("dht", self.dht))[:2 if self._own_dht else 1]:
            stop_process(part, proc)
        reap_helpers([self.averager.pid, self.dht.pid] if self._own_dht else [self.averager.pid])


def shutdown_dht(dht: Any) -> None:
    """Stop a started hivemind DHT node that no transport or client owns (a ``join`` that gave up, a
    :class:`~swarmloco.Swarm` closing), then whatever is left of its process group (p2pd)."""
    stop_process("dht", dht)
    reap_helpers([dht.pid])


def stop_process(part: str, proc: Any) -> None:
    """hivemind's own shutdown (bounded by its grace period), then SIGKILL if it is still alive."""
    try:
        if proc.is_alive():
            proc.shutdown()
    except Exception as e:  # noqa: BLE001
        logger.info("shutting down the %s failed: %s", part, e)
    if proc.is_alive():
        logger.info("the %s process did not stop in time; killing it", part)
        proc.kill()
        proc.join(5)


class DhtClient:
    """A DHT-only hivemind node (no averager): for the monitor (client mode) and bootstrap peers."""

    def __init__(self, cfg: SwarmConfig, *, identity_path: str | None = None, record_validators: Sequence[Any] = (),
                 stop: threading.Event | None = None):
        self.dht = start_dht(cfg, identity_path=identity_path, record_validators=record_validators, stop=stop)
        self.peer_id = self.dht.peer_id.to_base58()
        self._rejoiner = Rejoiner(self.dht, cfg.initial_peers)

    def add_validators(self, validators: Sequence[Any]) -> None:
        self.dht.add_validators(list(validators))

    def detach_dht(self) -> Any:
        """Hand the started DHT node over (to a SwarmTransport); this client no longer owns it."""
        dht, self.dht = self.dht, None
        self._rejoiner.dht = None
        return dht

    visible_maddrs = SwarmTransport.visible_maddrs
    store = SwarmTransport.store
    get = SwarmTransport.get

    def shutdown(self) -> None:
        if self.dht is None:
            return
        stop_process("dht", self.dht)
        reap_helpers([self.dht.pid])


def route_hivemind_logs() -> None:
    """Send hivemind's log records through the root logger (ours) instead of its own handler."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
