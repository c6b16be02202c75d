"""Serving and fetching proofs of lineage: the certificates behind a peer's state, since a common point.

A mixin for :class:`~swarmloco.protocol.allreduce.SwarmAverager`, running in hivemind's averager
process. The host pushes its chain in (``set_lineage``: only what changed since the last push), so a
request is answered there without a round trip to the training process.

``rpc_lineage_proof``: the asking peer sends a *locator* (points of its own chain: its tip, then
exponentially older steps, then its root). The answer starts from the newest of them that is on the
serving peer's chain too and holds every certificate from there to the serving peer's tip, in order,
in batches; ``from`` is None when no point is shared. What comes back is not trusted: the node
verifies the chain (:mod:`swarmloco.node.lineage`).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout

MAX_LOCATOR = 128
BATCH_BYTES = 256 * 1024
PIPE_MESSAGE_BYTES = 8 * 1024
"""The most certificate bytes in one message to the averager process (far below the 16 KiB above which
``multiprocessing`` writes a message in two parts)."""


def find_start(root: tuple[int, bytes], digests: list[bytes], locator) -> tuple[int, bytes] | None:
    """The newest locator point on the chain ``root`` + ``digests`` (digest after each round)."""
    root_step, root_digest = root
    for point in locator[:MAX_LOCATOR]:
        if not (isinstance(point, (list, tuple)) and len(point) == 2 and type(point[0]) is int
                and isinstance(point[1], bytes)):
            continue
        step, digest = point
        i = step - root_step
        if (i == 0 and digest == root_digest) or (0 < i <= len(digests) and digests[i - 1] == digest):
            return step, digest
    return None


class LineageSharing:
    """The lineage half of SwarmAverager (needs hivemind's DecentralizedAverager beside it)."""

    _lineage_root: tuple[int, bytes] | None = None
    _lineage_digests: list[bytes]
    _lineage_certs: list[bytes]

    # ----- the host's chain, pushed in -----------------------------------------------------------
    def set_lineage(self, root_step: int, root_digest: bytes, start: int, entries: list[tuple[bytes, bytes]],
                    timeout: float = 10.0) -> None:
        """Entries (digest after the round, encoded certificate) from index ``start`` on replace the rest.

        Sent in pieces of at most :data:`PIPE_MESSAGE_BYTES`: hivemind's averager process reads its pipe
        non-blocking (uvloop watches it), so a message the pipe delivers in two parts is read torn and the
        averager's loop dies with it."""
        root, entries = (int(root_step), bytes(root_digest)), list(entries)
        pieces, piece, size = [], [], 0
        for digest, cert in entries:
            if piece and size + len(digest) + len(cert) + 16 > PIPE_MESSAGE_BYTES:
                pieces.append(piece)
                piece, size = [], 0
            piece.append((digest, cert))
            size += len(digest) + len(cert) + 16
        pieces.append(piece)
        for piece in pieces:
            future = MPFuture()
            with self._pipe_lock:
                self._outer_pipe.send(("_set_lineage", [], dict(root=root, start=int(start), entries=piece,
                                                               future=future)))
            future.result(timeout)
            start += len(piece)

    async def _set_lineage(self, root, start: int, entries, future: MPFuture) -> None:
        if self._lineage_root != root:
            self._lineage_root, self._lineage_digests, self._lineage_certs = root, [], []
        del self._lineage_digests[start:], self._lineage_certs[start:]
        for digest, cert in entries:
            self._lineage_digests.append(digest)
            self._lineage_certs.append(cert)
        future.set_result(None)

    # ----- serving --------------------------------------------------------------------------------
    async def rpc_lineage_proof(self, request: averaging_pb2.DownloadData,
                                context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        """First message {"root", "from", "tip", "count"}; then batches of encoded certificates."""
        if not self._gate.may_download(context.remote_id):
            self._gate.note_refusal(context.remote_id, "at lineage proof")
            return
        if self._lineage_root is None:
            return
        try:
            spec = self.serializer.loads(request.metadata)
            locator = spec["locator"] if isinstance(spec, dict) and isinstance(spec.get("locator"), list) else []
        except Exception:  # noqa: BLE001 - a malformed request gets nothing
            return
        root, digests, certs = self._lineage_root, list(self._lineage_digests), list(self._lineage_certs)
        start = find_start(root, digests, locator)
        tip = (root[0] + len(digests), digests[-1] if digests else root[1])
        sent = certs[start[0] - root[0]:] if start is not None else []
        yield averaging_pb2.DownloadData(metadata=self.serializer.dumps(
            {"root": list(root), "from": list(start) if start else None, "tip": list(tip), "count": len(sent)}))
        batch, size = [], 0
        for cert in sent:
            batch.append(cert)
            size += len(cert)
            if size >= BATCH_BYTES:
                yield averaging_pb2.DownloadData(metadata=self.serializer.dumps(batch))
                batch, size = [], 0
        if batch:
            yield averaging_pb2.DownloadData(metadata=self.serializer.dumps(batch))

    # ----- fetching -------------------------------------------------------------------------------
    def fetch_lineage(self, peer_id: str, locator: list[tuple[int, bytes]], timeout: float, max_bytes: int) -> dict:
        """``{"root", "from", "tip", "certs"}`` from ``peer_id``; raises on any failure (one-line message)."""
        future = MPFuture()
        with self._pipe_lock:
            self._outer_pipe.send(("_fetch_lineage", [], dict(peer_id=peer_id, locator=[list(p) for p in locator],
                                                             timeout=timeout, max_bytes=max_bytes, future=future)))
        return future.result(timeout * 3 + 10)

    async def _fetch_lineage(self, peer_id: str, locator, timeout: float, max_bytes: int, future: MPFuture) -> None:
        try:
            future.set_result(await asyncio.wait_for(self._read_proof(peer_id, locator, timeout, max_bytes),
                                                     timeout * 3))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
            if not future.done():
                future.set_exception(ValueError(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__))

    async def _read_proof(self, peer_id: str, locator, timeout: float, max_bytes: int) -> dict:
        stub = self.get_stub(self._p2p, PeerID.from_base58(peer_id), namespace=self.prefix)
        request = averaging_pb2.DownloadData(metadata=self.serializer.dumps({"locator": locator}))
        stream = await asyncio.wait_for(stub.rpc_lineage_proof(request), timeout)
        head, certs, used = None, [], 0
        async for message in aiter_with_timeout(stream, timeout=timeout):
            used += len(message.metadata)
            if used > max_bytes:
                raise ValueError(f"the proof is larger than {max_bytes} bytes")
            obj = self.serializer.loads(message.metadata)
            if head is None:
                if not (isinstance(obj, dict) and {"root", "from", "tip", "count"} <= set(obj)):
                    raise ValueError("malformed proof header")
                head = obj
            elif isinstance(obj, list) and all(isinstance(c, bytes) for c in obj):
                certs += obj
                if len(certs) > head["count"]:
                    raise ValueError("more certificates than announced")
            else:
                raise ValueError("malformed proof batch")
        if head is None:
            raise ValueError("served no proof (no lineage yet, or refused)")
        if len(certs) != head["count"]:
            raise ValueError(f"sent {len(certs)} of {head['count']} certificates")
        return {"root": head["root"], "from": head["from"], "tip": head["tip"], "certs": certs}


__all__ = ["LineageSharing", "find_start"]
