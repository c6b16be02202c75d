"""Prometheus text exposition (format version 0.0.4) of a node's status dict.

A pure function over the status dict the node publishes (schema 1, see ``status_server``); it
never touches the node itself. Missing keys, ``None`` and non-finite values are left out, and a
metric family with no samples left is not written at all (no dangling HELP/TYPE lines).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PHASES = ("compute", "barrier", "matchmaking", "allreduce", "outer_step")

# name, type, help, key in the status dict
_SIMPLE: tuple[tuple[str, str, str, str], ...] = (
    ("swarmloco_outer_step", "gauge", "Outer step (round) this node is at.", "outer_step"),
    ("swarmloco_inner_step", "gauge", "Inner step within the current round.", "inner_step"),
    ("swarmloco_train_loss", "gauge", "Latest training loss.", "train_loss"),
    ("swarmloco_eval_loss", "gauge", "Latest evaluation loss.", "eval_loss"),
    ("swarmloco_samples_per_second", "gauge", "Local training throughput.", "samples_per_second"),
    ("swarmloco_bytes_sent_total", "counter", "Bytes sent to the swarm.", "bytes_sent_total"),
    ("swarmloco_bytes_received_total", "counter", "Bytes received from the swarm.",
     "bytes_received_total"),
    ("swarmloco_peers_online", "gauge", "Peers seen online in the swarm.", "peers_online"),
    ("swarmloco_round_seconds", "gauge", "Wall time of the last round, from its start to the next round's.",
     "last_round_time"),
    ("swarmloco_clock_offset_seconds", "gauge", "How far this machine's clock is behind the swarm's peers' "
     "(their heartbeats' median; negative: ahead).", "clock_offset_s"),
    ("swarmloco_rss_bytes", "gauge", "Resident memory of the node process.", "rss_bytes"),
    ("swarmloco_cuda_allocated_bytes", "gauge", "CUDA memory allocated by the node.",
     "cuda_allocated_bytes"),
)

Sample = tuple[Mapping[str, str], float | int]


def escape_label_value(value: str) -> str:
    """Escape a label value as the exposition format requires (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> float | int | None:
    """A finite number, or None for anything that should be left out."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def _format_value(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    lines: list[str] = []
    for labels, value in samples:
        if labels:
            body = ",".join(f'{k}="{escape_label_value(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{body}}} {_format_value(value)}")
        else:
            lines.append(f"{name} {_format_value(value)}")
    if not lines:
        return []
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]


def _samples(pairs: Iterable[tuple[Mapping[str, str], Any]]) -> list[Sample]:
    out: list[Sample] = []
    for labels, raw in pairs:
        value = _number(raw)
        if value is not None:
            out.append((labels, value))
    return out


def render_metrics(status: Mapping[str, Any]) -> str:
    """Render ``status`` as Prometheus text; always ends with a newline when non-empty."""
    lines: list[str] = []
    info = {
        key: str(status[key])
        for key in ("peer_id", "run_id", "manifest_hash", "state", "device")
        if status.get(key) is not None
    }
    if info:
        lines += _family("swarmloco_node_info", "gauge", "Identity and state of this node.",
                         [(info, 1)])
    for name, kind, help_text, key in _SIMPLE:
        lines += _family(name, kind, help_text, _samples([({}, status.get(key))]))

    last = status.get("last_round") or {}
    if not isinstance(last, Mapping):
        last = {}
    lines += _family(
        "swarmloco_round_phase_seconds", "gauge", "Seconds spent in each phase of the last round.",
        _samples(({"phase": p}, last.get(f"{p}_s")) for p in PHASES),
    )
    lines += _family("swarmloco_peers_in_round", "gauge", "Peers that took part in the last round.",
                     _samples([({}, last.get("peers"))]))
    lines += _family(
        "swarmloco_rounds_total", "counter", "Averaging rounds by result.",
        _samples([({"result": "ok"}, status.get("rounds_ok")),
                  ({"result": "failed"}, status.get("rounds_failed"))]),
    )
    return "\n".join(lines) + "\n" if lines else ""
