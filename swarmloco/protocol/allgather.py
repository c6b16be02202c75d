"""All-gather of sparse pseudo-gradients over hivemind's p2p layer (top-k codecs).

A sparse payload (indices + low-bit values) does not survive a butterfly all-reduce's part-by-part sum, so
every member sends its whole payload to every other and each sums all of them itself (as SparseLoCo and DeMo).

* **One stream per pair.** For members ``i < j``, ``i`` dials ``j`` (the averager's ``rpc_aggregate_part``,
  routed here by group id) and sends its payload; ``j`` answers on the same stream with its own. A member
  that cannot be dialed (client mode) dials instead. Each peer sends and receives ``(n-1) x payload`` bytes.
* **Identical results.** Every member decodes the same n payloads (its own too) and sums them in fp32 in the
  group's order, weighted by samples. With ``CodecInfo.per_sender`` each coordinate is divided by the weights
  of its senders (:func:`~swarmloco.protocol.robust.sender_mean`), else by all weights, and ``Codec.finish_mean``
  turns the mean back once (``rotate``, ``hadtopk``: a linear, norm-keeping basis). The average is the same
  bits on every member, like :mod:`swarmloco.protocol.allreduce`.
* **Checked.** A payload needs this run's codec tag, exactly the codec's byte length for the vector, a sane
  weight and values that decode (:class:`~swarmloco.compression.base.CodecError` otherwise). Every wait
  has a deadline.
* **Missing is failure.** A missing payload fails the round with :class:`PartialAllReduce`, naming the
  members whose stream broke (suspects) and those that timed out.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Sequence

import torch
from hivemind.averaging.allreduce import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import aiter_with_timeout, anext

from swarmloco.compression.base import Codec, CodecError
from swarmloco.compression.hivemind_bridge import TAG_PREFIX
from swarmloco.protocol import faults
from swarmloco.protocol.errors import InvalidContribution, PeerAnswered, RoundFailures
from swarmloco.protocol.robust import robust_combine


class ServingCounter:
    """How many handlers of this process are still serving group mates (shutdown waits for zero)."""

    def __init__(self):
        self.count = 0

    def add(self) -> None:
        self.count += 1

    def remove(self) -> None:
        self.count -= 1


serving = ServingCounter()
"""Handlers of this (averager) process still streaming to a group mate: averaged parts of the
all-reduce or our payload of the all-gather. A peer that leaves waits for zero (``SwarmAverager.drain``)."""
LINGER_S = 10.0
"""How long a handler keeps a finished stream open for the other side to close it first."""

CHUNK_BYTES = 1 << 19
"""Bytes of payload per stream message (well under libp2p's message limit)."""


async def connected(p2p, peer_id, *, if_unknown: bool, timeout: float = 2.0) -> bool:
    """Whether our p2p daemon holds a connection to ``peer_id`` (a peer that died has none: its daemon's
    sockets closed); ``if_unknown`` when the daemon cannot say within ``timeout``."""
    try:
        peers = await asyncio.wait_for(p2p.list_peers(), timeout)
    except Exception:  # noqa: BLE001
        return if_unknown
    return any(info.peer_id == peer_id for info in peers)


class SparseAllGatherRunner:
    """One all-gather among a group; ``await run()`` returns the weighted average as a flat fp32 tensor."""

    def __init__(self, *, codec: Codec, p2p, servicer_type, prefix: str, group_id: bytes,
                 ordered_peer_ids: Sequence[PeerID], dialable: Sequence[bool], tensors: Sequence[torch.Tensor],
                 weight: float, timeout: float, clip_factor: float = 0.0):
        self.codec, self.p2p, self.servicer_type, self.prefix = codec, p2p, servicer_type, prefix
        self.group_id, self.peers = group_id, list(ordered_peer_ids)
        self.peer_id = p2p.peer_id
        self.me = self.peers.index(self.peer_id)
        self.dialable = list(dialable)
        self.weight, self.timeout, self.clip_factor = float(weight), float(timeout), float(clip_factor)
        self.clipped = [0] * len(self.peers)  # per member: 1 if its update's norm was clipped
        self.capped = [0] * len(self.peers)  # per member: 1 if its claimed weight was capped
        self.tag = TAG_PREFIX + codec.info.name
        self._tensors = [t.detach().reshape(-1).to(torch.float32) for t in tensors]
        self.numel = sum(t.numel() for t in self._tensors)
        self.payload: bytes = b""
        self._lengths: list[int] = []  # bytes of each tensor's encoding (the same on every member)
        self._ready = asyncio.Event()  # our payload is encoded: we can answer a dialer
        self._checked: dict[int, torch.Tensor] = {}  # a member's payload, decoded when it came (its check)
        loop = asyncio.get_event_loop()
        self._received: dict[int, asyncio.Future] = {i: loop.create_future() for i in range(len(self.peers))
                                                     if i != self.me}
        self._started = {i: asyncio.Event() for i in self._received}  # a dialer's stream reached us
        self.bytes_sent = self.bytes_received = 0
        self.failures = RoundFailures("member")

    def dials(self, i: int, j: int) -> bool:
        """Whether member ``i`` opens the stream to member ``j`` (exactly one of a pair does)."""
        lo, hi = min(i, j), max(i, j)
        caller = hi if (self.dialable[lo] and not self.dialable[hi]) else lo
        return caller == i

    # ----- messages ---------------------------------------------------------------------------
    def _messages(self) -> list[averaging_pb2.AveragingData]:
        chunks = [self.payload[i: i + CHUNK_BYTES] for i in range(0, len(self.payload), CHUNK_BYTES)] or [b""]
        out = []
        for k, chunk in enumerate(chunks):
            part = runtime_pb2.Tensor(buffer=chunk, dtype=self.tag, size=[len(self.payload)] if k == 0 else [])
            out.append(averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=self.group_id,
                                                   weight=self.weight, tensor_part=part))
        self.bytes_sent += len(self.payload)
        return out

    async def _read_payload(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                            first: averaging_pb2.AveragingData | None = None) -> tuple[float, bytes]:
        """Read one member's payload off a stream; the first message says its length and weight."""
        if first is None:
            first = await asyncio.wait_for(anext(stream), self.timeout)
        if first.code != averaging_pb2.PART_FOR_AVERAGING:
            raise PeerAnswered(f"sent {averaging_pb2.MessageCode.Name(first.code)}")
        if first.tensor_part.dtype != self.tag:
            raise CodecError(f"payload encoded as {first.tensor_part.dtype!r}, this run uses {self.tag!r}")
        size = list(first.tensor_part.size)
        if size != [len(self.payload)]:
            raise CodecError(f"payload of {size} bytes, this codec sends {len(self.payload)} for this model")
        weight = first.weight
        if not (weight >= 0 and weight < float("inf")):
            raise InvalidContribution(f"sent invalid weight {weight}")
        buf = bytearray(first.tensor_part.buffer)
        if len(buf) < len(self.payload):
            async for msg in aiter_with_timeout(stream, self.timeout):
                buf += msg.tensor_part.buffer
                if len(buf) >= len(self.payload):
                    break
        if len(buf) != len(self.payload):
            raise CodecError(f"payload truncated or oversized: {len(buf)} of {len(self.payload)} bytes")
        self.bytes_received += len(buf)
        return weight, bytes(buf)

    def _settle(self, index: int, result=None, error: BaseException | None = None) -> None:
        fut = self._received[index]
        if fut.done():
            return
        if error is None:
            fut.set_result(result)
            return
        self.failures.record(self.peers[index].to_base58(), error)
        fut.set_exception(error)

    # ----- the two sides of a pair ------------------------------------------------------------
    async def _dial(self, index: int) -> None:
        try:
            stub = self.servicer_type.get_stub(self.p2p, self.peers[index], namespace=self.prefix)
            deadline = time.monotonic() + self.timeout

            async def outgoing():
                for msg in self._messages():
                    yield msg

            while True:
                stream = await asyncio.wait_for(stub.rpc_aggregate_part(outgoing()), self.timeout)
                replies = aiter_with_timeout(stream, self.timeout)
                first = await asyncio.wait_for(anext(replies), self.timeout)
                if first.code != averaging_pb2.BAD_GROUP_ID or time.monotonic() > deadline:
                    break
                # hivemind routes the stream by group id, and the mate has not registered this round yet
                # (it can learn of the group a moment after us): dial again shortly
                await asyncio.sleep(0.05)
            try:
                got = await self._read_payload(replies, first)
            finally:  # we close the stream first: the mate waits for it (see rpc_aggregate_part)
                await replies.aclose()
                await stream.aclose()
            self._checked[index] = await asyncio.get_event_loop().run_in_executor(None, self.decode, got[1])
            self._settle(index, got)
        except BaseException as e:  # noqa: BLE001 - a failed pair is recorded; the round fails as a whole
            self._settle(index, error=e)

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A member that dials us sends its payload; we answer with ours on the same stream."""
        if context.remote_id not in self.peers:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        index = self.peers.index(context.remote_id)
        if index == self.me or not self.dials(index, self.me) or self._started[index].is_set():
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        self._started[index].set()
        serving.add()
        try:
            first = await asyncio.wait_for(anext(stream), self.timeout)
            if first.group_id != self.group_id:
                yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
                raise AllreduceException("wrong group id")
            await asyncio.wait_for(self._ready.wait(), self.timeout)  # our payload's layout is the reference
            got = await self._read_payload(stream, first)
            self._checked[index] = await asyncio.get_event_loop().run_in_executor(None, self.decode, got[1])
        except BaseException as e:  # noqa: BLE001
            serving.remove()
            self._settle(index, error=e)
            if isinstance(e, Exception):
                yield averaging_pb2.AveragingData(code=averaging_pb2.INTERNAL_ERROR)
                return
            raise
        self._settle(index, got)
        try:
            for msg in self._messages():
                yield msg
        finally:
            serving.remove()
        # the dialer closes the stream once it has read our payload: a side that closed first could lose its
        # last messages in p2pd's teardown (as in allreduce.py); hivemind cancels this wait at the close
        await asyncio.sleep(LINGER_S)

    async def _await_dialer(self, index: int) -> None:
        """A member that should dial us must start within the timeout; then per-message timeouts apply."""
        try:
            await asyncio.wait_for(self._started[index].wait(), self.timeout)
        except asyncio.TimeoutError as e:
            self._settle(index, error=e)
            return
        await asyncio.wait([self._received[index]])

    # ----- the round ----------------------------------------------------------------------------
    async def run(self) -> torch.Tensor:
        loop = asyncio.get_event_loop()
        if faults.next_allreduce_hangs():  # injected fault (tests): a member that joined and never sends
            faults.announce("member hanging in the middle of an all-gather")
            await asyncio.sleep(3600)
        parts = await loop.run_in_executor(None, lambda: [self.codec.encode(t) for t in self._tensors])
        self._lengths = [len(part) for part in parts]
        self.payload = faults.corrupt(b"".join(parts))  # unchanged unless a test makes this peer hostile
        self._ready.set()
        dials = [asyncio.create_task(self._dial(i)) for i in self._received if self.dials(self.me, i)]
        try:
            await asyncio.gather(*dials, *(self._await_dialer(i) for i in self._received if not self.dials(self.me, i)))
        finally:
            for task in dials:
                task.cancel()
        contributions = {self.me: (self.weight, self.payload)}
        for i, fut in self._received.items():
            if not fut.cancelled() and fut.exception() is None:
                contributions[i] = fut.result()
        if len(contributions) < len(self.peers):
            raise self.failures.error(f"all-gather got {len(contributions)} of {len(self.peers)} contributions")
        return await loop.run_in_executor(None, self._average, contributions)

    def _average(self, contributions: dict[int, tuple[float, bytes]]) -> torch.Tensor:
        """The group's order, the same checks (:func:`robust_combine`) and so the same bits on every member."""
        members = sorted(contributions)
        decoded = {}
        for i in members:  # every member decodes the same payloads: all reject the same peers
            try:
                decoded[i] = self._checked[i] if i in self._checked else self.decode(contributions[i][1])
            except CodecError as e:
                self.failures.reject(self.peers[i].to_base58(), e, self.failures.role)
        if len(decoded) < len(members):
            raise self.failures.error(f"all-gather got {len(decoded)} valid of {len(members)} contributions")
        mean, clipped, capped = robust_combine([decoded[i] for i in members],
                                               [contributions[i][0] for i in members], self.clip_factor,
                                               sparse=self.codec.info.per_sender)
        for k in clipped:
            self.clipped[members[k]] = 1
        for k in capped:
            self.capped[members[k]] = 1
        return self._finish(mean)

    def decode(self, payload: bytes) -> torch.Tensor:
        """A member's payload as one flat fp32 vector as the group averages it (each tensor is encoded on its
        own, as the error feedback's round trip assumes; ``Codec.decode_for_mean``: hadamard coefficients (rotate,
        hadtopk) are turned back once, after the mean); CodecError if any piece is malformed."""
        out, at = [], 0
        for t, length in zip(self._tensors, self._lengths):
            out.append(self.codec.decode_for_mean(payload[at: at + length], t.numel()))
            at += length
        return torch.cat(out) if out else torch.zeros(0)

    def _finish(self, mean: torch.Tensor) -> torch.Tensor:
        """The group's mean as values, tensor by tensor (``Codec.finish_mean``)."""
        out, at = [], 0
        for t in self._tensors:
            out.append(self.codec.finish_mean(mean[at: at + t.numel()]))
            at += t.numel()
        return torch.cat(out) if out else mean


__all__ = ["CHUNK_BYTES", "ServingCounter", "SparseAllGatherRunner", "connected", "serving"]
