"""The one tiny interface every pseudo-gradient codec implements (after hivemind's compression/base.py).

A codec turns a float32 tensor into bytes and back. ``decode`` receives bytes from the network:
it must never trust them. Anything malformed (truncated, oversized, wrong header, NaN/Inf scales)
raises :class:`CodecError` with a one-line reason; the caller treats it as a failed contribution.

A codec brings its own knowledge: its settings (a :class:`CodecSettings` dataclass whose fields are its
``[codec]`` keys, with their defaults and checks), the rule of its error feedback
(:attr:`CodecSettings.feedback_decay`) and, in its :class:`CodecInfo`, the outer step it was tuned with and
where its unsent rest stays. The ``[codec]`` config section is gathered from the registered codecs' settings
(:mod:`~swarmloco.compression.registry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


class CodecError(ValueError):
    """A payload could not be decoded: the sender is faulty or hostile."""


@dataclass(frozen=True)
class CodecInfo:
    """What a codec is, for logs, status and the manifest."""

    name: str
    """Registry name, e.g. ``int8``."""
    bits_per_value: float
    """Average bits on the wire per encoded value, scales and headers included (large tensors)."""
    lossy: bool
    """Whether decode(encode(x)) may differ from x."""
    summable: bool
    """Dense codecs can be averaged part by part in an all-reduce; sparse ones need an all-gather."""
    per_sender: bool = False
    """Each payload holds its sender's own coordinates (zeros elsewhere): a round averages each coordinate
    over the peers that sent it (top-k: SparseLoCo's aggregation), not over the whole group."""
    rest_in_model: bool = False
    """What a round does not send stays in the peer's own parameters (``rotate``, ``hadtopk``): the peer lands
    at the new global parameters minus its rest (:class:`~swarmloco.compression.error_feedback.ErrorFeedback`'s
    ``in_model``), which needs error feedback on and blocking rounds of the whole model."""
    outer: tuple[float, float] | None = None
    """The Nesterov outer step (lr, momentum) this codec was tuned with, where it differs from dense DiLoCo's
    default: a run that names the codec and leaves ``outer.lr`` or ``outer.momentum`` unset gets its value
    (:meth:`swarmloco.outer_optim.config.OuterConfig.for_codec`)."""


@dataclass(frozen=True, kw_only=True)
class CodecSettings:
    """A codec's own ``[codec]`` keys (none here: the settings of a codec without any, e.g. ``fp16``).

    A codec with settings subclasses this as a frozen, keyword-only dataclass whose fields are named as the
    TOML keys (``topk_fraction``, not ``fraction``: every codec's keys share the one ``[codec]`` table), each
    with its default and a docstring, checked in ``__post_init__`` with a
    :class:`~swarmloco.checks.ConfigError` naming ``codec.<key>``. Every codec's settings are checked, the
    run's codec's or not, so a config holds no value that a later switch of ``codec.name`` would refuse.
    """

    def check_use(self) -> None:
        """The checks that bind only when the run's codec uses these settings (``rotate``: a power-of-two chunk
        with the hadamard basis), after the field checks of ``__post_init__``; none by default."""

    @property
    def feedback_decay(self) -> float:
        """How much of the error-feedback residual is carried into the next round: 1.0 (every dropped bit is
        sent later) unless the codec's settings say otherwise (``topk``: ``topk_decay``)."""
        return 1.0


class Codec(ABC):
    """Encode float32 tensors to bytes and back. Stateless and deterministic."""

    info: CodecInfo
    settings_class: ClassVar[type[CodecSettings]] = CodecSettings
    """The codec's settings: the ``[codec]`` keys it reads (:class:`CodecSettings` itself: none)."""

    @classmethod
    def from_settings(cls, settings: CodecSettings) -> Codec:
        """The codec a run's settings (a :attr:`settings_class` instance) describe."""
        return cls()

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> bytes:
        """Encode a float32 CPU tensor (any shape; it is flattened)."""

    @abstractmethod
    def decode(self, payload: bytes, numel: int) -> torch.Tensor:
        """Decode exactly ``numel`` float32 values (1-D) or raise CodecError."""

    def decode_for_mean(self, payload: bytes, numel: int) -> torch.Tensor:
        """The payload as a round averages it, or CodecError: :meth:`decode` for every codec but ``rotate`` in
        its hadamard basis, whose payloads are averaged as coefficients and turned back once by
        :meth:`finish_mean` (the rotation is linear and keeps norms)."""
        return self.decode(payload, numel)

    def finish_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """A weighted mean of :meth:`decode_for_mean` payloads (1-D, one tensor's) as values."""
        return mean

    def for_round(self, step: int) -> Codec:
        """The codec encoding the round of outer step ``step``: itself, except for codecs whose choice of values
        rotates with the round (``rotate``). Decoding needs no round: such payloads carry their phase."""
        return self

    def expected_ratio(self) -> float:
        """Wire bytes divided by fp32 bytes, for large tensors."""
        return self.info.bits_per_value / 32.0

    def roundtrip(self, tensor: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) in x's shape: what a receiver of ``tensor`` sees."""
        flat = tensor.detach().reshape(-1).to(torch.float32)
        return self.decode(self.encode(flat), flat.numel()).reshape(tensor.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name})"


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise CodecError if a decoded tensor holds NaN or Inf."""
    if tensor.numel() and not bool(torch.isfinite(torch.maximum(tensor.amax(), tensor.amin().neg()))):
        raise CodecError(f"{what}: decoded values contain NaN or Inf")
