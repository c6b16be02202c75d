"""Codec names -> codec objects, built from the run's CodecConfig."""

from __future__ import annotations

from collections.abc import Callable

from swarmloco.compression.base import Codec
from swarmloco.compression.floating import BFloat16Codec, Float16Codec
from swarmloco.compression.hadtopk import HadTopKCodec
from swarmloco.compression.int4 import Int4Codec
from swarmloco.compression.int8 import Int8Codec
from swarmloco.compression.none import Float32Codec
from swarmloco.compression.rotate import RotateCodec
from swarmloco.compression.topk import TopKCodec
from swarmloco.config import CodecConfig

_FACTORIES: dict[str, Callable[[CodecConfig], Codec]] = {
    "none": lambda cfg: Float32Codec(),
    "fp16": lambda cfg: Float16Codec(),
    "bf16": lambda cfg: BFloat16Codec(),
    "int8": lambda cfg: Int8Codec(cfg.block_size),
    "int4": lambda cfg: Int4Codec(cfg.block_size),
    "topk": lambda cfg: TopKCodec(cfg.topk_chunk, cfg.topk_fraction),
    "rotate": lambda cfg: RotateCodec(cfg.rotate_chunk, cfg.rotate_every, cfg.rotate_basis),
    "hadtopk": lambda cfg: HadTopKCodec(cfg.hadtopk_chunk, cfg.hadtopk_fraction),
}


def register_codec(name: str, factory: Callable[[CodecConfig], Codec]) -> None:
    _FACTORIES[name] = factory


def codec_names() -> list[str]:
    return sorted(_FACTORIES)


def get_codec(cfg: CodecConfig) -> Codec:
    """The codec the config names; ValueError naming the choices if it is unknown."""
    try:
        factory = _FACTORIES[cfg.name]
    except KeyError:
        raise ValueError(f"config: codec.name={cfg.name!r} is unknown; choose one of {', '.join(codec_names())}") from None
    return factory(cfg)
