"""Codecs for pseudo-gradients. Pure tensor math: nothing here touches the network."""

from swarmloco.compression.base import Codec, CodecError, CodecInfo
from swarmloco.compression.registry import codec_names, get_codec, register_codec

__all__ = ["Codec", "CodecError", "CodecInfo", "codec_names", "get_codec", "register_codec"]
