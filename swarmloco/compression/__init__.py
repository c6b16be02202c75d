"""Codecs for pseudo-gradients. Pure tensor math: nothing here touches the network."""

from swarmloco.compression.base import Codec, CodecError, CodecInfo, CodecSettings
from swarmloco.compression.registry import CodecConfig, codec_names, get_codec

__all__ = ["Codec", "CodecConfig", "CodecError", "CodecInfo", "CodecSettings", "codec_names", "get_codec"]
