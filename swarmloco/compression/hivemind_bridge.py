"""Our codecs as hivemind ``CompressionBase`` objects, so hivemind's all-reduce carries them.

hivemind dispatches deserialization on a protobuf enum it owns, which cannot name our codecs.
We tag each message's ``dtype`` field with ``swarmloco/<codec>`` instead, and the all-reduce
runner in :mod:`swarmloco.protocol.allreduce` decodes parts with :func:`decode_part`, which checks
the tag, the part's expected size and the values before anything is summed.
"""

from __future__ import annotations

import torch
from hivemind.compression.base import CompressionBase, CompressionInfo
from hivemind.proto import runtime_pb2

from swarmloco.compression.base import Codec, CodecError

TAG_PREFIX = "swarmloco/"


class HivemindCodec(CompressionBase):
    """Wraps a :class:`Codec` in hivemind's compression interface."""

    compression_type = runtime_pb2.CompressionType.NONE  # never used to dispatch: see decode_part

    def __init__(self, codec: Codec):
        self.codec = codec
        self.tag = TAG_PREFIX + codec.info.name

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        flat = tensor.detach().reshape(-1).to(torch.float32)
        return self.compress_payload(self.codec.encode(flat), tensor.shape)

    def compress_payload(self, payload: bytes, shape) -> runtime_pb2.Tensor:
        """Wrap already-encoded bytes in hivemind's tensor message."""
        return runtime_pb2.Tensor(
            compression=self.compression_type, buffer=payload, size=list(shape), requires_grad=False, dtype=self.tag
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape = tuple(serialized_tensor.size)
        numel = 1
        for dim in shape:
            numel *= dim
        return decode_part(serialized_tensor, self.codec, numel).reshape(shape)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.codec.expected_ratio()


def decode_part(message: runtime_pb2.Tensor, codec: Codec, expected_numel: int) -> torch.Tensor:
    """Decode one all-reduce part from a peer, or raise CodecError saying why it is unacceptable."""
    tag = TAG_PREFIX + codec.info.name
    if message.dtype != tag:
        raise CodecError(f"part encoded as {message.dtype!r}, this run uses {tag!r}")
    numel = 1
    for dim in message.size:
        numel *= dim
    if numel != expected_numel or len(message.size) > 8:
        raise CodecError(f"part has shape {list(message.size)}, expected {expected_numel} values")
    return codec.decode(message.buffer, expected_numel)
