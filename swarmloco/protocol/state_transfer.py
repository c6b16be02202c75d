"""Serving and downloading a peer's state (late joiners, restarts, peers that fell behind).

A mixin for :class:`~swarmloco.protocol.allreduce.SwarmAverager`, running in hivemind's averager process.
The state is whatever the node's provider returns: msgpack-able metadata plus tensors.

* **Sharded, from several peers at once.** A joiner asks each of up to ``parallel`` sources for one shard
  (``rpc_download_shard``): the tensors cut into ``k`` contiguous groups of about equal bytes, by a rule
  every source computes alike, so one volunteer's upload does not bound the download. Shards are combined
  only if all carry the same state metadata and together cover every tensor exactly once.
* **Whole, from one peer.** If a sharded download fails for any reason, the joiner falls back to hivemind's
  ``rpc_download_state`` from one source after another.

Every stream is bounded by ``timeout`` per message and all of them together by ``max_bytes``. The result is
not trusted: the node checks shapes, values and the digest before adopting it
(:func:`swarmloco.node.state_sync.unpack_state`).
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Sequence

import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

MAX_SHARDS = 64


def shard_of(sizes: Sequence[int], shards: int) -> list[int]:
    """Which shard each tensor belongs to: contiguous groups of about ``total / shards`` bytes each."""
    total = sum(sizes) or 1
    out, seen = [], 0
    for size in sizes:
        out.append(min(shards - 1, int(shards * (seen + size / 2) / total)))
        seen += size
    return out


class _Budget:
    """Bytes all streams of one download may still bring (a hostile source cannot flood us)."""

    def __init__(self, max_bytes: int):
        self.left, self.used = max_bytes, 0

    def take(self, n: int) -> None:
        self.left -= n
        self.used += n
        if self.left < 0:
            raise ValueError("sources sent more bytes than a state of this run takes")


class StateSharing:
    """The state-transfer half of SwarmAverager (needs hivemind's DecentralizedAverager beside it)."""

    state_provider = None
    """Called in the host process when a peer downloads our state: returns (metadata, tensors)."""

    # ----- serving --------------------------------------------------------------------------------
    def get_current_state(self):
        """Runs in the host process (hivemind's fetch thread) when a peer asks for our state."""
        if self.state_provider is None:
            raise RuntimeError("this peer has no state to share yet")
        metadata, tensors = self.state_provider()
        return metadata, tensors, None

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest,
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        """hivemind's whole-state download, refused (nothing sent) to peers the gate refuses."""
        if not self._gate.may_download(context.remote_id):
            self._gate.note_refusal(context.remote_id, "at state download")
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def rpc_download_shard(self, request: averaging_pb2.DownloadData,
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        """Serve shard ``i`` of ``k`` of our state: first message {"state", "count", "indices"}, then tensors
        (``state``: the metadata, serialized by the host process)."""
        if not self._gate.may_download(context.remote_id):
            self._gate.note_refusal(context.remote_id, "at state download")
            return
        try:
            spec = self.serializer.loads(request.metadata)
            shard, shards = int(spec["shard"]), int(spec["of"])
            if not 0 <= shard < shards <= MAX_SHARDS:
                raise ValueError(f"no shard {shard} of {shards}")
        except Exception:  # noqa: BLE001 - a malformed request gets nothing
            return
        if not self.allow_state_sharing:
            return
        metadata, tensors, _ = await self._get_current_state_from_host_process()
        owners = shard_of([t.numel() * t.element_size() for t in tensors], shards)
        indices = [i for i, owner in enumerate(owners) if owner == shard]
        head = self.serializer.dumps({"state": metadata, "count": len(tensors), "indices": indices})
        yield averaging_pb2.DownloadData(metadata=head)
        for i in indices:
            info = CompressionInfo.from_tensor(tensors[i], key=i)
            for part in split_for_streaming(self.state_compression.compress(tensors[i], info, allow_inplace=False)):
                yield averaging_pb2.DownloadData(tensor_part=part)

    # ----- downloading ----------------------------------------------------------------------------
    def download_state(self, peer_ids: Sequence[str], timeout: float, max_bytes: int, parallel: int = 1) -> dict:
        """Download a state from ``peer_ids`` (sharded over up to ``parallel`` of them, else one by one).

        Returns ``{"peer", "metadata", "tensors", "bytes", "seconds", "sources", "errors"}``, or only
        ``errors`` when no peer served a state.
        """
        future = MPFuture()
        with self._pipe_lock:
            self._outer_pipe.send(("_download_state", [], dict(peer_ids=list(peer_ids), timeout=timeout,
                                                                max_bytes=max_bytes, parallel=parallel, future=future)))
        return future.result(timeout * (len(peer_ids) + 3) + 30)

    async def _download_state(self, peer_ids: list, timeout: float, max_bytes: int, parallel: int,
                              future: MPFuture) -> None:
        errors: list[str] = []
        try:
            sources = [p for p in peer_ids if p != self.peer_id.to_base58()]
            if parallel > 1 and len(sources) > 1:
                start = time.perf_counter()
                try:
                    got = await self._download_sharded(sources[:min(parallel, MAX_SHARDS)], timeout, max_bytes)
                    future.set_result({**got, "seconds": time.perf_counter() - start, "errors": errors})
                    return
                except Exception as e:  # noqa: BLE001 - fall back to one source at a time
                    errors.append(f"sharded download failed ({type(e).__name__}: {e}); trying one source at a time")
            for peer_b58 in sources:
                start = time.perf_counter()
                try:
                    metadata, tensors, nbytes = await self._download_whole(peer_b58, timeout, _Budget(max_bytes))
                    future.set_result(dict(peer=peer_b58, metadata=metadata, tensors=tensors, bytes=nbytes,
                                           seconds=time.perf_counter() - start, sources=[peer_b58], errors=errors))
                    return
                except Exception as e:  # noqa: BLE001 - a bad or dead source: try the next one
                    errors.append(f"{peer_b58[-8:]}: {type(e).__name__}: {e}")
            future.set_result(dict(errors=errors))
        except BaseException as e:  # noqa: BLE001
            if not future.done():
                future.set_exception(e)

    async def _read_tensors(self, stream, timeout: float, budget: _Budget) -> tuple[bytes | None, list[torch.Tensor]]:
        """Read a DownloadData stream: (the first non-empty metadata, the tensors in order)."""
        metadata, tensors, parts = None, [], []
        async for message in aiter_with_timeout(stream, timeout=timeout):
            budget.take(len(message.tensor_part.buffer) + len(message.metadata))
            if message.metadata and metadata is None:
                metadata = message.metadata
            if not message.HasField("tensor_part"):
                continue
            if message.tensor_part.dtype and parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(message.tensor_part)
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        return metadata, tensors

    async def _download_whole(self, peer_b58: str, timeout: float, budget: _Budget):
        stub = self.get_stub(self._p2p, PeerID.from_base58(peer_b58), namespace=self.prefix)
        stream = await asyncio.wait_for(stub.rpc_download_state(averaging_pb2.DownloadRequest()), timeout)
        raw, tensors = await self._read_tensors(stream, timeout, budget)
        if raw is None:
            raise ValueError("sent no state")
        return self.serializer.loads(raw), tensors, budget.used

    async def _download_shard(self, peer_b58: str, shard: int, shards: int, timeout: float, budget: _Budget):
        stub = self.get_stub(self._p2p, PeerID.from_base58(peer_b58), namespace=self.prefix)
        request = averaging_pb2.DownloadData(metadata=self.serializer.dumps({"shard": shard, "of": shards}))
        stream = await asyncio.wait_for(stub.rpc_download_shard(request), timeout)
        raw, tensors = await self._read_tensors(stream, timeout, budget)
        if raw is None:
            raise ValueError(f"{peer_b58[-8:]} sent no shard")
        head = self.serializer.loads(raw)
        if not (isinstance(head, dict) and isinstance(head.get("indices"), list) and isinstance(head.get("count"), int)
                and len(head["indices"]) == len(tensors)):
            raise ValueError(f"{peer_b58[-8:]} sent a malformed shard")
        return head, tensors

    async def _download_sharded(self, sources: list[str], timeout: float, max_bytes: int) -> dict:
        budget = _Budget(max_bytes)
        shards = len(sources)
        heads_and_tensors = await asyncio.gather(
            *(self._download_shard(peer, i, shards, timeout, budget) for i, peer in enumerate(sources)))
        first = heads_and_tensors[0][0]
        count = first["count"]
        if not 0 < count <= 1 << 16:
            raise ValueError(f"a state of {count} tensors")
        if any(head["state"] != first["state"] or head["count"] != count for head, _ in heads_and_tensors):
            raise ValueError("sources hold different states (one moved on during the download)")
        tensors: list[torch.Tensor | None] = [None] * count
        for head, part in heads_and_tensors:
            for i, tensor in zip(head["indices"], part):
                if not (isinstance(i, int) and 0 <= i < count) or tensors[i] is not None:
                    raise ValueError("shards overlap or name tensors out of range")
                tensors[i] = tensor
        if any(t is None for t in tensors):
            raise ValueError("shards do not cover the whole state")
        # "state" is the metadata as the host process serialized it: equal bytes, equal states
        return dict(peer=sources[0], metadata=self.serializer.loads(first["state"]), tensors=tensors,
                    bytes=budget.used, sources=sources)


__all__ = ["StateSharing", "shard_of"]
