"""The exact butterfly all-reduce: hivemind's ``AllReduceRunner`` (1.1.12), made exact, strict and
observable. :class:`~swarmloco.protocol.allreduce.SwarmAverager` runs it for every summable codec.

1. **Bit-identical results.** hivemind's reducers send back ``average - part`` and each peer adds it to
   its own tensor, which differs from ``avg`` in the last bits, and from peer to peer. Our reducers send
   the averaged part itself (encoded once with the run's codec) and every peer, the reducer included,
   takes the decoded bytes as they are, so every member ends the round with the same bits.
2. **Who failed is known.** The peer ids of reducers whose stream broke travel with the exception
   (``PartialAllReduce.suspects``), so the survivors re-run the round without them. Reducers that only
   timed out are named, not suspected: a live reducer is often late because it waits for a dead peer.
3. **Our codecs, checked.** Parts are decoded with :func:`swarmloco.compression.hivemind_bridge.decode_part`
   (tag, size, finite values) instead of hivemind's deserializer, and the bytes sent and received are counted.
4. **No live member lost to the transport.** A sender stops reading once it has every averaged part and
   closes the stream first; the reducer keeps its finished stream open until then (p2pd can reset a stream
   its writer closes while the reader still writes, losing the last parts).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Sequence

import torch
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner
from hivemind.averaging.partition import BannedException, TensorPartContainer
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import (
    aiter_with_timeout,
    amap_in_executor,
    attach_event_on_finished,
)

from swarmloco.compression.base import Codec
from swarmloco.compression.hivemind_bridge import HivemindCodec, decode_part
from swarmloco.protocol import faults
from swarmloco.protocol.allgather import LINGER_S, connected, serving
from swarmloco.protocol.errors import InvalidContribution, PeerAnswered, RoundFailures, is_invalid
from swarmloco.protocol.robust import RobustPartReducer


async def _numbered(stream):
    """Pair each message with its index, so decoding (prefetched in threads) knows which part it is."""
    index = 0
    async for item in stream:
        yield index, item
        index += 1


class _EndedShort(AllreduceException):
    """A reducer's stream ended cleanly before it sent every averaged part."""


class _NotInGroup(AllreduceException):
    """A member of our group answered that it is running no such group."""


class ExactAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose outputs are the averaged values themselves, identical on every peer."""

    def __init__(self, *, codec: Codec, tensors: Sequence[torch.Tensor], peer_fractions, clip_factor: float = 0.0,
                 **kwargs):
        part_kwargs = {k: kwargs[k] for k in ("compression", "part_size_bytes", "tensor_infos", "prefetch") if k in kwargs}
        super().__init__(tensors=tensors, peer_fractions=peer_fractions, **kwargs)
        self.codec = codec
        # rebuild the container so that it returns averaged values rather than deltas
        self.tensor_part_container = TensorPartContainer(tensors, peer_fractions, return_deltas=False, **part_kwargs)
        self.parts_for_local_averaging = self.tensor_part_container.get_raw_input_parts(
            self.ordered_peer_ids.index(self.peer_id)
        )
        # contributions are checked before they are averaged (norm and weight clipping, protocol/robust.py)
        self.tensor_part_reducer.finished.set()  # hivemind's own reducer goes unused (and must not log so)
        self.tensor_part_reducer = RobustPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids), clip_factor)
        self._part_shapes = [
            [part.shape for part, _ in self.tensor_part_container._input_parts_by_peer[i]]
            for i in range(len(self.ordered_peer_ids))
        ]  # input parts are freed as they are sent: keep their shapes to check what comes back
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_progress = time.monotonic()  # when a part last arrived (or its reducer failed)
        self.failures = RoundFailures("reducer")
        self.doomed = asyncio.Event()
        """Set when a reducer's connection is gone: its part is lost for every member, so the round cannot
        succeed anywhere and waiting for the other parts would only stall the group."""
        self._hang = faults.next_allreduce_hangs()

    def _decode(self, message, expected_numel: int) -> torch.Tensor:
        self.bytes_received += len(message.buffer)
        return decode_part(message, self.codec, expected_numel)

    async def _communicate_with_peer(self, peer_id):
        peer_index = self.ordered_peer_ids.index(peer_id)
        shapes = self._part_shapes[peer_index]
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                averaged_part = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=self.weight
                )
                # what the other peers receive for this part: the same codec round trip
                result = self.codec.roundtrip(averaged_part).reshape(tensor_part.shape)
                self.tensor_part_container.register_processed_part(peer_index, part_index, result)
                self.last_progress = time.monotonic()
            return
        try:
            done_sending = asyncio.Event()
            inputs_aiter = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            # hivemind opens the stream with no deadline: to a peer killed a moment ago it can hang until
            # the whole all-reduce times out, and the others then blame this peer's slow reducer too
            stream = await asyncio.wait_for(self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter),
                                            self.reducer_timeout)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            part_index = 0

            def _try_deserialize(index_and_msg):
                index, msg = index_and_msg
                if msg.code == averaging_pb2.BAD_GROUP_ID:
                    raise _NotInGroup(f"{peer_id} is not in this group (its join timed out?)")
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise PeerAnswered(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                if index >= len(shapes):
                    raise InvalidContribution(f"{peer_id} sent more parts than expected")
                return self._decode(msg.tensor_part, shapes[index].numel()).reshape(shapes[index])

            expected = self.tensor_part_container.num_parts_by_peer[peer_index]
            async with contextlib.aclosing(amap_in_executor(
                _try_deserialize, _numbered(aiter_with_timeout(stream, self.reducer_timeout)), max_prefetch=1
            )) as parts:
                async for averaged in parts:
                    self.tensor_part_container.register_processed_part(peer_index, part_index, averaged)
                    self.last_progress = time.monotonic()
                    part_index += 1
                    if part_index == expected:  # we close the stream first (the reducer waits for it)
                        break
            if part_index != expected:
                raise _EndedShort(f"peer {peer_id} sent {part_index} parts, expected {expected}")
        except BaseException as e:
            self.last_progress = time.monotonic()
            self.failures.record(peer_id.to_base58(), e)
            # gone, or never here: a member counted into the group whose leader's answer it never got (a join
            # that timed out under load) will not send its parts nor reduce ours
            gone = isinstance(e, (ConnectionError, asyncio.IncompleteReadError, EOFError, _NotInGroup))
            if isinstance(e, _EndedShort) and peer_id in self.sender_peer_ids and peer_id not in self.active_senders:
                # the stream of a peer that died ends as if it were complete. One that never opened its own
                # stream to us and is no longer connected is gone: our reducer would otherwise wait
                # sender_timeout for its parts before the group learns what every member will (its part is lost)
                gone = not await connected(self._p2p, peer_id, if_unknown=True)  # (unknown: its parts are waited for)
            if gone and peer_id in self.sender_peer_ids and peer_id not in self.banned_senders:
                # its connection is gone: stop waiting for its parts as a sender too, or our reducer would
                # hold every other peer for sender_timeout when it died before sending to us. Only then: a
                # live peer whose reducer merely failed us must still get our reducer's results, or one
                # failed link would fail every link.
                await self._ban_sender(peer_id)
            self.tensor_part_container.register_failed_reducer(peer_index)
            if gone:
                self.doomed.set()
            raise

    async def rpc_aggregate_part(self, stream, context):
        """hivemind's handler, plus one invariant: when a sender's stream ends, the sender either
        delivered every part or is banned. hivemind marks a sender active before it checks the request,
        and some exits (a rejected request, a stream reset in the p2p layer) skip the ban: our reducer
        would then wait forever for parts that never come, holding every peer of the group."""
        serving.add()
        answered = 0
        try:
            async for message in super().rpc_aggregate_part(stream, context):
                answered += message.code == averaging_pb2.AVERAGED_PART
                yield message
        finally:
            serving.remove()
            sender = context.remote_id
            if sender in self.sender_peer_ids and sender not in self.banned_senders:
                index = self.sender_peer_ids.index(sender)
                if self.tensor_part_reducer.num_parts_received[index] < self.tensor_part_reducer.num_parts:
                    await self._ban_sender(sender)
        if answered == self.tensor_part_reducer.num_parts:
            # let the sender close the stream once it has read our last part (_communicate_with_peer): a
            # reducer that closes first can have p2pd reset the stream with our last parts in flight, and a
            # live, healthy sender sees it end short ("sent k parts, expected n") and fails a round the
            # others commit. hivemind's stream handler cancels this wait at the close.
            await asyncio.sleep(LINGER_S)

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super()._generate_input_for_peer(peer_index):
            message.tensor_part.buffer = faults.corrupt(message.tensor_part.buffer)  # a hostile peer (tests)
            self.bytes_sent += len(message.tensor_part.buffer)
            yield message

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        part_index = 0
        shapes = self.tensor_part_reducer.part_shapes
        try:
            loop = asyncio.get_event_loop()

            def _decode_msg(index_and_msg):
                index, msg = index_and_msg
                if index >= len(shapes):
                    raise InvalidContribution("sender sent more parts than expected")
                return self._decode(msg.tensor_part, shapes[index].numel()).reshape(shapes[index]), msg.weight

            async for tensor_part, weight in amap_in_executor(_decode_msg, _numbered(stream), max_prefetch=1):
                if not (weight >= 0 and weight < float("inf")):
                    raise InvalidContribution(f"sender sent invalid weight {weight}")
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                    part_index += 1
                except BannedException:
                    break
                if self._hang:  # injected fault (tests): a reducer that has its inputs and never answers
                    self._hang = faults.stalling()  # a staller hangs every stream; hang_allreduce only this one
                    faults.announce("reducer hanging in the middle of an all-reduce")
                    await asyncio.sleep(3600)
                payload = await loop.run_in_executor(None, self.codec.encode, averaged_part)
                self.bytes_sent += len(payload)
                yield averaging_pb2.AveragingData(
                    code=averaging_pb2.AVERAGED_PART,
                    tensor_part=HivemindCodec(self.codec).compress_payload(payload, averaged_part.shape),
                )
        except BaseException as e:
            if is_invalid(e):  # NaN/Inf, undecodable, wrong size or weight: name it, the node excludes it
                self.failures.reject(self.sender_peer_ids[sender_index].to_base58(), e, "sender")
            raise
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    @property
    def failed_size(self) -> int:
        return self.tensor_part_container.failed_size


__all__ = ["ExactAllReduceRunner"]
