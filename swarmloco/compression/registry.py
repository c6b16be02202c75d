"""The codecs a run can name, and the ``[codec]`` config section gathered from their settings.

Each codec brings its own knowledge (:mod:`~swarmloco.compression.base`): its settings class (the ``[codec]``
keys it reads, their defaults and checks), its error-feedback rule, and in its :class:`CodecInfo` the outer step
it was tuned with and whether its unsent rest stays in the model. :class:`CodecConfig` holds ``name``, every
registered codec's settings fields and ``error_feedback``, flat, as the TOML table does; so adding a codec is
its module and one line of :data:`CODECS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from swarmloco.checks import check, check_bool
from swarmloco.compression.base import Codec, CodecSettings
from swarmloco.compression.floating import BFloat16Codec, Float16Codec
from swarmloco.compression.hadtopk import HadTopKCodec
from swarmloco.compression.int4 import Int4Codec
from swarmloco.compression.int8 import Int8Codec
from swarmloco.compression.none import Float32Codec
from swarmloco.compression.rotate import RotateCodec
from swarmloco.compression.topk import TopKCodec

__all__ = ["CODECS", "CodecConfig", "codec_names", "get_codec"]

CODECS: dict[str, type[Codec]] = {
    "none": Float32Codec,
    "fp16": Float16Codec,
    "bf16": BFloat16Codec,
    "int8": Int8Codec,
    "int4": Int4Codec,
    "topk": TopKCodec,
    "rotate": RotateCodec,
    "hadtopk": HadTopKCodec,
}
"""Every codec a run can name, by its ``codec.name``; their settings fields are :class:`CodecConfig`'s, in this
order (a settings class that several codecs share, e.g. int8's and int4's ``block_size``, once)."""

SETTINGS_CLASSES: tuple[type[CodecSettings], ...] = tuple(dict.fromkeys(c.settings_class for c in CODECS.values()))


def codec_names() -> list[str]:
    return sorted(CODECS)


def get_codec(cfg: CodecConfig) -> Codec:
    """The codec the config names; ValueError naming the choices if it is unknown."""
    try:
        codec_class = CODECS[cfg.name]
    except KeyError:
        raise ValueError(f"config: codec.name={cfg.name!r} is unknown; "
                         f"choose one of {', '.join(codec_names())}") from None
    return codec_class.from_settings(cfg.settings)


@dataclass(frozen=True, kw_only=True)
class _Common:
    """The ``[codec]`` keys of every run, whatever codec it names; :class:`CodecConfig` puts the codecs' own keys
    between the two."""

    name: str = "none"
    """Codec name: none (fp32), fp16, bf16, int8, int4, topk (SparseLoCo), rotate (a shared rotating share of the
    coordinates at 1 bit, the rest kept in the model), hadtopk (each chunk's largest Hadamard coefficients at
    1 bit, the rest kept in the model); see swarmloco.compression."""
    error_feedback: bool = True
    """Carry what compression dropped from a peer's pseudo-gradient into its next one (rotate, hadtopk: in the
    peer's own parameters; it cannot be turned off there)."""


class _CodecSection:
    """The behaviour of :class:`CodecConfig`, whose fields are gathered from the codecs' settings below."""

    name: str
    error_feedback: bool

    def __post_init__(self) -> None:
        names = codec_names()
        check(isinstance(self.name, str) and self.name in names, "codec.name", self.name,
              f"must be one of {', '.join(names)}")
        used = CODECS[self.name].settings_class
        for settings_class in SETTINGS_CLASSES:  # every codec's settings are checked, used or not
            settings = self._settings(settings_class)
            if settings_class is used:
                settings.check_use()
        check_bool("codec.error_feedback", self.error_feedback)
        check(self.error_feedback or not self.rest_in_model, "codec.error_feedback", self.error_feedback,
              f"must be true with {self.name} (what a round does not send stays in the peer's parameters)")

    def _settings(self, settings_class: type[CodecSettings]) -> CodecSettings:
        """This config's values of ``settings_class``'s fields, as one (checked by its ``__post_init__``)."""
        return settings_class(**{f.name: getattr(self, f.name) for f in dataclasses.fields(settings_class)})

    @property
    def settings(self) -> CodecSettings:
        """The named codec's settings (e.g. a :class:`~swarmloco.compression.topk.TopKSettings` for ``topk``)."""
        return self._settings(CODECS[self.name].settings_class)

    @property
    def outer_defaults(self) -> dict[str, float]:
        """The outer settings the codec was tuned with where they differ from the dense defaults (its
        ``CodecInfo.outer``, as ``{"lr": ..., "momentum": ...}``), else none: what an unset field takes."""
        tuned = get_codec(self).info.outer
        return {} if tuned is None else {"lr": tuned[0], "momentum": tuned[1]}

    @property
    def rest_in_model(self) -> bool:
        """Whether the codec keeps a round's unsent rest in the peer's parameters (rotate, hadtopk): its
        ``CodecInfo.rest_in_model``."""
        return get_codec(self).info.rest_in_model

    def check_outer(self, outer: Any) -> None:
        """The checks that need the outer settings (``outer``: the run's
        :class:`~swarmloco.outer_optim.config.OuterConfig`): ``rotate`` and ``hadtopk`` keep the unsent rest in
        the model, which rounds that land behind the inner steps or sync one fragment at a time do not support
        (yet)."""
        if not self.rest_in_model:
            return
        check(not outer.overlapped, "outer.overlap", outer.overlap,
              f'must be "none" with codec.name = "{self.name}" (the unsent rest is kept in the model when a '
              "round lands)")
        check(outer.fragments == 1, "outer.fragments", outer.fragments, f'must be 1 with codec.name = "{self.name}"')


def _gathered_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """``name``, the fields of :data:`SETTINGS_CLASSES` in order, ``error_feedback``; TypeError if two codecs'
    settings claim the same key (they share the one ``[codec]`` table)."""
    common = {f.name: f for f in dataclasses.fields(_Common)}
    gathered: dict[str, dataclasses.Field] = {"name": common["name"]}
    for settings_class in SETTINGS_CLASSES:
        for f in dataclasses.fields(settings_class):
            if f.name in gathered or f.name in common:
                raise TypeError(f"codec settings {settings_class.__name__}: the key {f.name!r} is taken")
            gathered[f.name] = f
    gathered["error_feedback"] = common["error_feedback"]
    return [(f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory))
            for f in gathered.values()]


CodecConfig = dataclasses.make_dataclass("CodecConfig", _gathered_fields(), bases=(_CodecSection,), frozen=True,
                                         kw_only=True)
CodecConfig.__module__ = __name__
CodecConfig.__doc__ = """How pseudo-gradients are encoded on the wire: the ``[codec]`` section of a run.

Its fields: ``name`` (which codec), every registered codec's settings fields (``block_size``,
``topk_fraction``, ``rotate_basis``...: documented in their codec's settings class) and ``error_feedback``.
A frozen, keyword-only dataclass: ``CodecConfig(name="topk", topk_fraction=0.02)``."""
