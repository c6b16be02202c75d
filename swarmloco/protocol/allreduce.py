"""hivemind's ``DecentralizedAverager`` (1.1.12) for swarmloco: strict rounds, sparse all-gather, state.

1. **Exact and strict.** Summable codecs run :class:`~swarmloco.protocol.exact_allreduce.ExactAllReduceRunner`
   (bit-identical results, named failures, checked codecs). **Partial results are failures**: when a
   reducer dies, hivemind keeps each peer's own slice of that part, logs "received 62% results" and
   reports success, so replicas silently diverge; we count the failed parts and fail the round instead
   (:class:`PartialAllReduce`).
2. **Sparse codecs all-gather.** A top-k payload does not add up part by part: with a codec that is
   not ``summable`` the group runs :class:`~swarmloco.protocol.allgather.SparseAllGatherRunner`
   instead (every member gets every payload and sums them in the group's order).
3. **A member counted in a group it never learned of** (its join timed out) says so at once instead of
   holding the group (:meth:`SwarmAverager.rpc_aggregate_part`).
4. The matchmaking gate, state and lineage serving, abort, drain and a clean shutdown mid-round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, AsyncIterator, Sequence

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import achain, anext, as_aiter, azip

from swarmloco.compression.base import Codec, CodecError
from swarmloco.compression.hivemind_bridge import HivemindCodec
from swarmloco.protocol.allgather import SparseAllGatherRunner, serving
from swarmloco.protocol.errors import PartialAllReduce
from swarmloco.protocol.exact_allreduce import ExactAllReduceRunner
from swarmloco.protocol.gate import Gate, gate_matchmaking
from swarmloco.protocol.lineage_transfer import LineageSharing
from swarmloco.protocol.matchmaking import SwarmMatchmaking
from swarmloco.protocol.robust import name_clipped
from swarmloco.protocol.state_transfer import StateSharing

logger = logging.getLogger(__name__)


class SwarmAverager(StateSharing, LineageSharing, DecentralizedAverager):
    """DecentralizedAverager running :class:`ExactAllReduceRunner`; a round's result carries metadata.

    State transfer (serving ours, downloading another peer's) comes from
    :class:`~swarmloco.protocol.state_transfer.StateSharing`, lineage proofs from
    :class:`~swarmloco.protocol.lineage_transfer.LineageSharing`. Every command to the averager process
    goes through one pipe: sends are serialized by ``_pipe_lock`` (the training loop and the heartbeat and
    lineage threads all send; a long message sent by two threads at once would interleave).

    ``step()`` returns ``{"gathered": {peer_id_b58: data}, "bytes_sent": int, "bytes_received": int,
    "allreduce_s": float, "group_size": int}`` on success and raises on any failure, partial results
    included.
    """

    def __init__(self, *args, codec: Codec, clip_factor: float = 0.0, gate: Gate | None = None, **kwargs):
        self._codec = codec
        self._clip_factor = clip_factor
        self._gate = gate or Gate()  # who may average with us (protocol/gate.py); set before the fork
        self._pipe_lock = threading.Lock()
        self._abort: asyncio.Event | None = None  # created in the averager process: abort_round sets it
        super().__init__(*args, compression=HivemindCodec(codec), **kwargs)

    def step(self, *args, parts: Sequence[int] | None = None, members: Sequence[str] | None = None,
             leader: str | None = None, round_step: int = 0, **kwargs):
        """hivemind's ``step``; ``parts``: the indices of the averaged tensors this round averages (a streaming
        fragment), None for all of them; ``members``: the peer ids the ready barrier expects in the group and
        ``leader`` the one they follow (:mod:`swarmloco.protocol.matchmaking`); ``round_step``: the outer step the
        round is for (a codec whose values rotate with the round encodes for it). Sent ahead of the step through
        the same pipe, so the round gets them."""
        with self._pipe_lock:
            self._outer_pipe.send(("_set_round", [], dict(parts=None if parts is None else tuple(map(int, parts)),
                                                          members=tuple(map(str, members or ())),
                                                          leader=None if leader is None else str(leader),
                                                          round_step=int(round_step))))
            return super().step(*args, **kwargs)

    async def _set_round(self, parts: tuple[int, ...] | None, members: tuple[str, ...], leader: str | None,
                         round_step: int = 0) -> None:
        self._next_parts, self._next_members, self._next_leader = parts, members, leader
        self._next_round_step = round_step

    def abort_round(self, reason: str) -> None:
        """Give up the all-reduce running now (its group mates already know it failed): the round then
        fails at once instead of waiting out its timeouts."""
        with self._pipe_lock:
            self._outer_pipe.send(("_abort_round", [], dict(reason=str(reason)[:200])))

    async def _abort_round(self, reason: str) -> None:
        self._abort_reason = reason
        if self._abort is not None:
            self._abort.set()

    @property
    def _matchmaking(self):
        try:
            return self.__dict__["_gated_matchmaking"]
        except KeyError:
            raise AttributeError("_matchmaking") from None

    @_matchmaking.setter
    def _matchmaking(self, matchmaking) -> None:  # hivemind builds it in the averager process
        gated = gate_matchmaking(matchmaking, self._gate)
        gated.__class__ = SwarmMatchmaking  # (only methods and class defaults added: see protocol/matchmaking.py)
        self.__dict__["_gated_matchmaking"] = gated

    def set_gate(self, private: bool, admitted, excluded, timeout: float = 10.0) -> None:
        """Tell the averager process whom to refuse at matchmaking (and, if private, at state download)."""
        future = MPFuture()
        with self._pipe_lock:
            self._outer_pipe.send(("_set_gate", [], dict(private=bool(private), admitted=frozenset(admitted),
                                                        excluded=frozenset(excluded), future=future)))
        future.result(timeout)

    async def _set_gate(self, private: bool, admitted, excluded, future: MPFuture) -> None:
        self._gate.update(private, admitted, excluded)
        future.set_result(None)

    async def _shutdown(self, timeout: float | None) -> None:
        """Leave cleanly, also mid-round. hivemind's own ``_shutdown`` calls ``finalize`` on the *futures* of
        its running groups (not their runners) and so dies with a traceback on the averager's thread whenever
        a peer stops in the middle of a round; here the runners that exist are cancelled (their group mates
        see a failed round, as if this peer had died) and groups still forming are dropped."""
        if not self.client_mode:
            try:
                await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
            except Exception as e:  # noqa: BLE001 - leaving anyway
                logger.debug("removing the averager's handlers failed: %s", e)
        for future in list(self._running_groups.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().finalize(cancel=True)
            elif not future.done():
                future.cancel()

    def drain(self, timeout: float) -> bool:
        """Wait (at most ``timeout``) until this peer has sent its group mates every averaged part it owes
        them: a peer leaving right after its last round would otherwise cut its mates' round short."""
        future = MPFuture()
        with self._pipe_lock:
            self._outer_pipe.send(("_drain", [], dict(timeout=timeout, future=future)))
        return future.result(timeout + 5)

    async def _drain(self, timeout: float, future: MPFuture) -> None:
        deadline = time.monotonic() + timeout
        while serving.count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        future.set_result(serving.count == 0)

    def set_target_group_size(self, size: int, timeout: float = 10.0) -> None:
        """Let the next round start as soon as ``size`` peers joined (they passed the ready barrier)."""
        future = MPFuture()
        with self._pipe_lock:
            self._outer_pipe.send(("_set_target_group_size", [], dict(size=int(size), future=future)))
        future.result(timeout)

    async def _set_target_group_size(self, size: int, future: MPFuture) -> None:
        try:
            matchmaking = self._matchmaking
            matchmaking.target_group_size = size
            matchmaking.potential_leaders.target_group_size = size
            # not the group key manager's: it would sample a bucket per member from range(size) and raise when
            # a group larger than this peer's barrier count takes it in (another view of the ready set), and
            # the follower would never learn of a group that counted it in. We keep no group bits; None sizes
            # the buckets by the group itself
            matchmaking.group_key_manager.target_group_size = None
            future.set_result(None)
        except Exception as e:  # noqa: BLE001
            if not future.done():
                future.set_exception(e)

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        """hivemind's handler, except for a stream of a group this peer is not running. hivemind waits until
        this peer registers *any* group (its leader's answer may be a moment behind a mate's stream). A
        peer whose join request got no answer in time may be counted in by that leader all the same, and
        would then hold the whole group until its reducer timeout: such a peer (following no leader)
        answers BAD_GROUP_ID at once, and the others fail the round at once and re-run it. Any other
        wait is bounded by ``next_chunk_timeout``."""
        request = await anext(stream)
        if request.group_id not in self._running_groups and not self._pending_groups_registered.is_set():
            matchmaking = self._matchmaking
            if not (matchmaking.join_timed_out and matchmaking.current_leader is None):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._pending_groups_registered.wait(), self.next_chunk_timeout or 10.0)
        future = self._running_groups.get(request.group_id)
        if future is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        group = await future
        async for message in group.rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs) -> Any:
        self._round_stats = {}
        try:
            gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        except MatchmakingException as e:  # hivemind re-wraps every failure: keep ours, with its suspects
            if isinstance(e.__context__, PartialAllReduce):
                raise e.__context__ from None
            raise
        return {
            "gathered": {peer.to_base58(): data for peer, data in gathered.items()},
            "group_size": len(group_info.peer_ids),
            **self._round_stats,
        }

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        start = time.perf_counter()
        tensors = self._select_parts(tensors, kwargs)
        if not self._codec.info.summable:  # sparse payloads do not add up part by part: all-gather them
            return await self._run_allgather_inplace_(tensors, group_info, group_id, start, **kwargs)
        runner = ExactAllReduceRunner(
            codec=self._codec,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            clip_factor=self._clip_factor,
            **kwargs,
        )
        if group_id not in self._running_groups:
            raise AllreduceException(f"group {group_id!r} was not registered")
        self._running_groups[group_id].set_result(runner)
        try:
            await self._run_exact(runner, tensors, start)
        finally:
            reducer = runner.tensor_part_reducer
            clipped, capped = name_clipped(runner.sender_peer_ids, reducer.clipped_parts, reducer.capped_parts)
        self._round_stats.update(clipped=clipped, capped=capped, rejected=list(runner.failures.rejected))

    async def _run_exact(self, runner: ExactAllReduceRunner, tensors, start: float) -> None:
        if runner.modes[runner.ordered_peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
            return
        await self._consume_with_watchdog(runner, tensors)
        if runner.failed_size:
            total = sum(t.numel() for t in tensors)
            raise runner.failures.error(f"only {100 * (1 - runner.failed_size / total):.1f}% of values were averaged")
        self._round_stats = {
            "bytes_sent": runner.bytes_sent,
            "bytes_received": runner.bytes_received,
            "allreduce_s": time.perf_counter() - start,
        }

    async def _consume_with_watchdog(self, runner: ExactAllReduceRunner, tensors) -> None:
        """Copy the averaged tensors out as they come; give up if no part arrives or fails for too long,
        or at once when the node aborts the round (its group mates already re-run it).

        Each stream has its own timeout, but a peer can still wait on a part whose reducer is itself
        stuck behind a dead peer; without this, such a peer would sit in a doomed round until
        ``allreduce_timeout`` while its group has moved on.
        """
        async def consume() -> None:
            async for tensor, averaged in azip(as_aiter(*tensors), runner):
                tensor.copy_(averaged.reshape(tensor.shape))

        stall = (runner.sender_timeout or 10.0) + (runner.reducer_timeout or 20.0)
        await self._until_done_or_aborted(consume(), stall_s=stall, last_progress=lambda: runner.last_progress,
                                          doomed=runner.doomed,
                                          doom=lambda: runner.failures.error("a reducer's connection is gone"))

    async def _until_done_or_aborted(self, coro, stall_s: float | None = None, last_progress=None,
                                     doomed: asyncio.Event | None = None, doom=None):
        """Run ``coro``; raise AllreduceException if the node aborts the round, if ``doomed`` is set (then
        ``doom()``), or if ``last_progress()`` is older than ``stall_s``."""
        task = asyncio.ensure_future(coro)
        abort = self._abort if self._abort is not None else asyncio.Event()
        waiters = {asyncio.ensure_future(abort.wait())} | ({asyncio.ensure_future(doomed.wait())} if doomed else set())
        try:
            while not task.done():
                await asyncio.wait({task, *waiters}, timeout=1.0 if stall_s is None else min(1.0, stall_s / 4),
                                   return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    break
                if doomed is not None and doomed.is_set():
                    raise doom()
                if abort.is_set():
                    raise AllreduceException(f"abandoned: {getattr(self, '_abort_reason', 'aborted')}")
                if stall_s is not None and not task.done() and time.monotonic() - last_progress() > stall_s:
                    raise AllreduceException(f"no part arrived or failed for {stall_s:.0f}s: abandoning the round")
            return await task
        finally:
            for waiter in waiters:
                waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _step(self, *, step, future_for_init):
        self._abort = asyncio.Event()  # a new round: an abort meant for the last one cannot reach it
        self._round_parts = getattr(self, "_next_parts", None)  # (one round runs at a time)
        self._round_codec = self._codec.for_round(getattr(self, "_next_round_step", 0))
        self._matchmaking.expect(getattr(self, "_next_members", ()), getattr(self, "_next_leader", None))
        return await super()._step(step=step, future_for_init=future_for_init)

    def _select_parts(self, tensors, kwargs: dict):
        """The tensors (and their compression infos) of this round's fragment."""
        parts = getattr(self, "_round_parts", None)
        if parts is None:
            return tensors
        if "tensor_infos" in kwargs and kwargs["tensor_infos"] is not None:
            kwargs["tensor_infos"] = [kwargs["tensor_infos"][i] for i in parts]
        return [tensors[i] for i in parts]

    async def _run_allgather_inplace_(self, tensors, group_info, group_id, start: float, **kwargs):
        modes = [AveragingMode(self.serializer.loads(g)[1]) for g in group_info.gathered]
        runner = SparseAllGatherRunner(
            codec=getattr(self, "_round_codec", self._codec), p2p=self._p2p, servicer_type=type(self),
            prefix=self.prefix, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, dialable=[m != AveragingMode.CLIENT for m in modes],
            tensors=tensors, weight=float(kwargs.get("weight") or 1.0),
            timeout=kwargs.get("sender_timeout") or self.next_chunk_timeout or 30.0, clip_factor=self._clip_factor,
        )
        if group_id not in self._running_groups:
            raise AllreduceException(f"group {group_id!r} was not registered")
        self._running_groups[group_id].set_result(runner)  # hivemind routes rpc_aggregate_part to it
        try:
            flat = await self._until_done_or_aborted(runner.run())
        finally:
            clipped, capped = name_clipped(runner.peers, runner.clipped, runner.capped)
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset: offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
        self._round_stats = {
            "bytes_sent": runner.bytes_sent,
            "bytes_received": runner.bytes_received,
            "allreduce_s": time.perf_counter() - start,
            "clipped": clipped,
            "capped": capped,
            "rejected": list(runner.failures.rejected),
        }


__all__ = ["ExactAllReduceRunner", "SwarmAverager", "PartialAllReduce", "CodecError"]
