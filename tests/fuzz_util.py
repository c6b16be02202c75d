"""Shared machinery of the fuzz tests: settings, hostile-input generators and the fuzz-target type.

Every fuzz test runs under :func:`fuzz_settings`: no deadline, no example database, derandomized
(the same inputs on every run, so the wall time is bounded and a failure reproduces), and no
health checks (some strategies are deliberately large or slow to generate).

Environment knobs for a longer or a different campaign (not used by CI):

* ``SWARMLOCO_FUZZ_SCALE=10`` multiplies every example count;
* ``SWARMLOCO_FUZZ_RANDOM=1`` draws fresh random inputs instead of the derandomized ones.

Hostile inputs are random bytes, or genuine ones after the edits of a *program*: a byte string drawn
by hypothesis says which edits to apply (:func:`mutate` for raw bytes, :func:`mutate_msgpack` for
msgpack structures). Two cheap draws per input (see ``hostile``) keep generation at a fraction of a
millisecond, and hypothesis still shrinks a failing program to a minimal edit.
"""

from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import msgpack
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

SCALE = float(os.environ.get("SWARMLOCO_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("SWARMLOCO_FUZZ_RANDOM", "") not in ("", "0")
REQUIRED_INPUTS = 10_000  # the bar: generated hostile inputs per decoder/validator, all tests together


def fuzz_settings(examples: int) -> settings:
    """Settings of every fuzz test: ``examples`` (times SCALE) examples in a bounded, reproducible time."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        suppress_health_check=list(HealthCheck),
    )


# ----- byte-level mutation ------------------------------------------------------------------------

INTERESTING_8 = (
    0x00, 0x01, 0x7F, 0x80, 0xFF, 0x5C,  # 0x5C: the codec header magic
    0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xCA, 0xCB, 0xCF, 0xD3,  # msgpack nil, unused, bools, bin, float, int
    0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x80, 0x90, 0xA0, 0x8F, 0x9F, 0xBF,  # str/array/map headers
)
INTERESTING_32 = (
    0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000, 0x10001, 256, 257,
    0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,  # float32 +inf, -inf, nan, -nan
    0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000001, 0x7E800000,  # float32 max, -max, subnormals, 2**126
)
INTERESTING_64 = (0, 1, 2, 255, 256, 2**31, 2**32, 2**32 + 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1)
_EDIT = 4  # program bytes per edit: op, position (2 bytes), argument


def mutate(seed: bytes, program: bytes, *, max_growth: int = 512) -> bytes:
    """``seed`` with the edits ``program`` describes; any program is valid, b"" leaves ``seed`` as is.

    Each 4-byte group ``op, pos_lo, pos_hi, arg`` is one edit at ``pos % (len + 1)``: flip a bit, set a
    byte (to ``arg`` or an interesting value), insert, delete, truncate, overwrite 4 or 8 bytes with an
    interesting little-endian integer / float32 bit pattern, duplicate a slice, or fill the rest of the
    input with the rest of the program repeated (random contents of an exact length; ends the program).
    In-place edits are the most likely: they keep lengths right and so reach the deeper checks.
    """
    data = bytearray(seed)
    limit = len(seed) + max_growth
    for i in range(0, len(program) - _EDIT + 1, _EDIT):
        op, lo, hi, arg = program[i: i + _EDIT]
        pos = (lo | hi << 8) % (len(data) + 1)
        op %= 16
        if op <= 5 and pos == len(data):
            data.append(arg)
        elif op <= 1:
            data[pos] ^= 1 << (arg % 8)
        elif op <= 3:
            data[pos] = arg
        elif op <= 5:
            data[pos] = INTERESTING_8[arg % len(INTERESTING_8)]
        elif op <= 7:
            data[pos: pos + 4] = INTERESTING_32[arg % len(INTERESTING_32)].to_bytes(4, "little")
        elif op <= 9:
            data[pos: pos + 8] = INTERESTING_64[arg % len(INTERESTING_64)].to_bytes(8, "little")
        elif op == 10:
            data.insert(pos, arg)
        elif op == 11:
            del data[pos: pos + arg % 8 + 1]
        elif op == 12:
            del data[pos:]
        elif op == 13:
            data[pos:pos] = data[pos: pos + arg % 64 + 1]
        else:
            rest = program[i + _EDIT:] or bytes([arg])
            n = len(data) - pos
            data[pos:] = (rest * (n // len(rest) + 1))[:n]
            break
        del data[limit:]
    return bytes(data)


# ----- msgpack structure mutation -----------------------------------------------------------------

_DEEP: Any = []
for _ in range(40):
    _DEEP = [_DEEP]
INTERESTING_VALUES = (
    None, True, False, 0, 1, -1, 2, 2**31, 2**63 - 1, -(2**63), 2**64 - 1,
    0.0, -0.0, 1.5, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf, 1.7e9, 4.1e9,
    "", "a", "progress", "token", "manifest", "heartbeat", "Progress", "x" * 33, "\u00e9", "sl_fuzz_tokens",
    b"", b"\x00" * 32, b"\xff" * 64, b"x" * 31, b"x" * 33, b"x" * 65,
    [], {}, [1, [2, [3]]], {"k": 1}, {b"k": b"v"}, {1: 2}, {"": None}, _DEEP, ["a"] * 20,
)
INTERESTING_KEYS = ("v", "kind", "author", "expires", "key", "body", "sig", "", "x", "V", b"v", b"sig", 0, -1, None)
_STRUCT_EDIT = 3  # program bytes per edit: op, which node, argument


def _slots(obj: Any, out: list, depth: int = 0) -> list:
    """Every (container, key) pair under ``obj``, depth first; maps and lists only, bounded depth."""
    if depth > 8:
        return out
    if isinstance(obj, dict):
        for k in list(obj):
            out.append((obj, k))
            _slots(obj[k], out, depth + 1)
    elif isinstance(obj, list):
        for k in range(len(obj)):
            out.append((obj, k))
            _slots(obj[k], out, depth + 1)
    return out


def _retype(value: Any, arg: int) -> Any:
    if isinstance(value, str):
        return value.encode() if arg % 2 else value[:-1]
    if isinstance(value, bytes):
        return value.decode("latin-1") if arg % 2 else value[:-1] + bytes([arg])
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return float(value) if arg % 2 else value + (arg % 3) - 1
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and arg % 2 else math.nextafter(value, math.inf)
    if isinstance(value, dict):
        return list(value.items()) if arg % 2 else list(value.values())
    if isinstance(value, list):
        return dict(enumerate(value)) if arg % 2 else [value]
    return [value]


def mutate_msgpack(seed: Any, program: bytes) -> bytes:
    """msgpack of a structurally edited copy of ``seed`` (a decoded msgpack object).

    The first program byte picks the packing (str/bin types kept apart or not, float32 or float64);
    each following 3-byte group ``op, node, arg`` edits one map entry or list element: replace it with an
    interesting value, delete it, add a sibling entry, change its type, or nest it in a list/map.
    """
    obj = copy.deepcopy(seed)
    flags = program[0] if program else 0
    for i in range(1, len(program) - _STRUCT_EDIT + 1, _STRUCT_EDIT):
        op, which, arg = program[i: i + _STRUCT_EDIT]
        slots = _slots(obj, [])
        value = copy.deepcopy(INTERESTING_VALUES[arg % len(INTERESTING_VALUES)])  # edits must not alias it
        if not slots:
            obj = value if op % 2 else _retype(obj, arg)
            continue
        parent, key = slots[which % len(slots)]
        op %= 6
        if op == 0:
            parent[key] = value
        elif op == 1:
            del parent[key]
        elif op == 2 and isinstance(parent, dict):
            parent[INTERESTING_KEYS[arg % len(INTERESTING_KEYS)]] = value
        elif op == 2:
            parent.insert(key, value)
        elif op == 3:
            parent[key] = _retype(parent[key], arg)
        elif op == 4:
            parent[key] = [parent[key]] if arg % 2 else {"x": parent[key]}
        else:
            obj = value if arg % 8 == 0 else obj
    try:
        return msgpack.packb(obj, use_bin_type=not flags & 1, use_single_float=bool(flags & 2))
    except (TypeError, ValueError, OverflowError):
        return msgpack.packb(seed, use_bin_type=True)


# ----- strategies ---------------------------------------------------------------------------------
#
# Every hostile input is built from two draws: a selector (which seed, which kind of edit, which of
# the other arguments: see ``digits``) and a blob (random bytes, or an edit program). Nested
# strategies cost a hypothesis draw per level; two draws keep an input near 0.25 ms, checks included
# (hypothesis's own overhead dominates: it is also why inputs are fed in batches). Put the
# choice that matters most in the first digit: hypothesis favours small integers, so the later digits
# lean towards their first option. The blob has at least BLOB_MIN bytes because hypothesis's byte
# strings are otherwise mostly a few bytes long; random-bytes modes cut it to a chosen length or
# extend it (up to ~1 KB) with a PRNG seeded by it.

BLOB_MIN = 16
LONG = -1
RANDOM_LENGTHS = (0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 64, 10**6, LONG)  # 10**6: all of the blob
_EDIT_COUNTS = (1, 1, 1, 2, 2, 3, 4, 6)


def hostile(build: Callable[[int, bytes], Any], choices: int, *, max_size: int = 320) -> SearchStrategy:
    """Inputs ``build(selector, blob)`` for ``selector`` in ``range(choices)`` and a random ``blob``."""
    return st.builds(build, st.integers(0, max(1, choices) - 1), st.binary(min_size=BLOB_MIN, max_size=max_size))


def digits(selector: int, *radixes: int) -> list[int]:
    """``selector`` in mixed radix, least significant first: one draw picks several choices."""
    out = []
    for radix in radixes:
        selector, digit = divmod(selector, radix)
        out.append(digit)
    return out


def random_bytes(blob: bytes, choice: int) -> bytes:
    """Random bytes of one of the RANDOM_LENGTHS (short inputs hit boundary checks): a prefix of
    ``blob``, or ``blob`` extended by a PRNG seeded with it (hypothesis draws bytes one by one, slowly)."""
    length = RANDOM_LENGTHS[choice % len(RANDOM_LENGTHS)]
    if length == LONG:
        return blob + random.Random(blob).randbytes(blob[0] * 4 if blob else 0)
    return blob[:length]


def edit_program(blob: bytes) -> bytes:
    """A :func:`mutate` program of 1 to 6 edits (its first byte says how many)."""
    edits = _EDIT_COUNTS[blob[0] % len(_EDIT_COUNTS)] if blob else 1
    return blob[1: 1 + _EDIT * edits].ljust(_EDIT, b"\0")


def fields_program(blob: bytes) -> bytes:
    """A :func:`mutate_msgpack` program: packing flags and 1 to 6 field edits."""
    edits = _EDIT_COUNTS[blob[1] % len(_EDIT_COUNTS)] if len(blob) > 1 else 1
    return blob[:1].ljust(1, b"\0") + blob[2: 2 + _STRUCT_EDIT * edits].ljust(_STRUCT_EDIT, b"\0")


class HostileBytes:
    """``(selector, blob)`` -> hostile bytes: random bytes, a seed after byte edits (:func:`mutate`), a
    seed after field edits (:func:`mutate_msgpack`, for msgpack seeds), or one of the fixed ``extra``
    inputs (e.g. values of the wrong type)."""

    def __init__(self, seeds: Sequence[bytes], *, structured: bool = False, extra: Sequence[Any] = ()):
        self.seeds, self.extra = tuple(seeds), tuple(extra)
        self.objects = tuple(msgpack.unpackb(s, raw=False, strict_map_key=False) for s in seeds) if structured else ()
        self.modes = (("random", "random") + ("edit",) * 3 * bool(seeds) + ("fields",) * 3 * structured
                      + ("extra",) * bool(extra))
        self.choices = len(self.modes) * max(len(self.seeds), len(self.extra), len(RANDOM_LENGTHS))

    def __call__(self, selector: int, blob: bytes) -> Any:
        mode, choice = digits(selector, len(self.modes), self.choices // len(self.modes))
        mode = self.modes[mode]
        if mode == "edit":
            return mutate(self.seeds[choice % len(self.seeds)], edit_program(blob))
        if mode == "fields":
            return mutate_msgpack(self.objects[choice % len(self.objects)], fields_program(blob))
        if mode == "extra":
            return self.extra[choice % len(self.extra)]
        return random_bytes(blob, choice)

    def __repr__(self) -> str:
        return f"HostileBytes(<{len(self.seeds)} seeds>, modes={self.modes}, <{len(self.extra)} extra>)"


def hostile_bytes(seeds: Sequence[bytes], *, extra: Sequence[Any] = ()) -> SearchStrategy:
    """Random bytes, and genuine ``seeds`` after random byte edits."""
    build = HostileBytes(seeds, extra=extra)
    return hostile(build, build.choices)


def hostile_msgpack(seeds: Sequence[bytes], *, extra: Sequence[Any] = ()) -> SearchStrategy:
    """:func:`hostile_bytes` plus random field edits of the seeds (for msgpack formats)."""
    build = HostileBytes(seeds, structured=True, extra=extra)
    return hostile(build, build.choices)


# ----- fuzz targets -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FuzzTarget:
    """One decoder or validator under fuzzing.

    ``call(input)`` feeds it one hostile input drawn from ``inputs``. It must either return (and
    ``check(input, result)``, if given, must hold) or raise one of ``errors`` with a one-line message;
    anything else is a crash. ``count`` inputs are fed in batches of ``batch`` per hypothesis example
    (batching amortizes hypothesis's per-example overhead). ``elsewhere`` counts inputs the decoder
    gets from other fuzz tests, so that ``count + elsewhere`` meets :data:`REQUIRED_INPUTS`.
    """

    name: str
    call: Callable[[Any], Any]
    inputs: SearchStrategy
    errors: tuple[type[BaseException], ...] = ()
    count: int = REQUIRED_INPUTS
    batch: int = 32
    check: Callable[[Any, Any], None] | None = None
    elsewhere: int = 0

    @property
    def examples(self) -> int:
        return -(-self.count // self.batch)

    def __str__(self) -> str:
        return self.name


def feed(target: FuzzTarget, item: Any) -> None:
    """One input to ``target``: a documented one-line error or a result passing ``check``, nothing else."""
    try:
        result = target.call(item)
    except target.errors as e:
        message = str(e)
        assert message and "\n" not in message, f"{target.name}: error is not one line: {message!r}"
        return
    except Exception as e:
        raise AssertionError(f"{target.name} raised {type(e).__name__}: {e}") from e
    if target.check is not None:
        target.check(item, result)


def run_target(target: FuzzTarget) -> int:
    """Fuzz ``target`` with its ``count`` inputs; returns how many inputs it was fed."""
    fed = [0]

    @fuzz_settings(target.examples)
    @given(st.lists(target.inputs, min_size=target.batch, max_size=target.batch))
    def fuzz(batch):
        for i, item in enumerate(batch):
            try:
                feed(target, item)
            except BaseException:
                note(f"{target.name}: the failing input is batch[{i}] = {item!r}")
                raise
        fed[0] += len(batch)

    fuzz()
    return fed[0]
