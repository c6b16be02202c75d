"""The summaries of ``scripts/bench_wan.py``: per-arm figures from the peers' round records (utilization over
the steady state, samples/s, bytes, the held-out loss at the target step), the table, and ``--resummarize``."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import types
from pathlib import Path


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


DETAIL_KEYS = ("compute_s", "blocked_s", "sync_s", "barrier_s", "matchmaking_s", "allreduce_s", "outer_step_s",
               "round_time")


def summarize(peers, args, rounds: int, fragments: int = 1) -> dict:
    """Per-peer and per-arm figures from ``peers`` (each with ``index`` and its ``records``, as read)."""
    per_peer = []
    for p in peers:
        recs = sorted(p.records, key=lambda r: r["t_read"])
        if not recs:
            continue
        # the steady state: neither the first round (start-up) nor the rounds in flight when training stopped (a
        # peer that stops waits for them to land, training no more: the last one, or with F fragments up to F)
        body = recs[1:-fragments] if len(recs) > fragments + 1 else recs[1:]
        has_compute = all("compute_s" in r for r in body)
        compute = sum(r["compute_s"] if has_compute else r["round_time"] - r.get("sync_s", 0.0) for r in body)
        has_blocked = bool(body) and all(_finite(r.get("blocked_s")) for r in body)
        blocked = sum(r["blocked_s"] for r in body) if has_blocked else None
        # the training loop's time: computing (compute_s) or waiting for / applying a round (blocked_s)
        wall = compute + blocked if has_blocked else (body[-1]["t_read"] - recs[0]["t_read"] if body else 0.0)
        samples = sum(r.get("samples", 0) for r in body)
        inner = sum(r.get("inner_steps", 0) for r in recs)
        nbytes = [r.get("bytes_sent", 0) + r.get("bytes_received", 0) for r in recs]
        evals = [(r["outer_step"], r["eval_loss"]) for r in recs if _finite(r.get("eval_loss"))]
        at_target = [e for step, e in evals if step == rounds]
        parts = {k: sum(r[k] for r in body) for k in DETAIL_KEYS if body and all(_finite(r.get(k)) for r in body)}
        per_peer.append({
            "peer": p.index, "records": len(recs), "ok_rounds": sum(1 for r in recs if r.get("ok")),
            "failed_rounds": sum(1 for r in recs if not r.get("ok")), "adopted": sum(1 for r in recs if r.get("adopted")),
            "wall_s": wall, "compute_s": compute, "compute_source": "compute_s" if has_compute else "round_time-sync_s",
            "util_compute": compute / wall if wall > 0 else None,
            "util_blocked": (1 - blocked / wall) if has_blocked and wall > 0 else None,
            "wall_between_records_s": (body[-1]["t_read"] - recs[0]["t_read"]) if body else None,
            "samples_per_s": samples / wall if wall > 0 else None, "inner_steps": inner,
            "bytes_per_round": statistics.fmean(nbytes), "bytes_total": sum(nbytes),
            "mean_round_time": statistics.fmean(r.get("round_time", 0.0) for r in body) if body else None,
            "mean_sync_s": statistics.fmean(r.get("sync_s", 0.0) for r in body) if body else None,
            "last_outer_step": recs[-1].get("outer_step"),
            "final_eval_loss": evals[-1][1] if evals else None, "final_eval_outer_step": evals[-1][0] if evals else None,
            "last_record_eval_loss": recs[-1].get("eval_loss"), "digest": recs[-1].get("digest"),
            "eval_at_target_step": at_target[-1] if at_target else None,
            "digest_at_target_step": next((r.get("digest") for r in reversed(recs) if r.get("outer_step") == rounds
                                           and r.get("ok")), None),
            "sums_s": parts, "sums_fraction_of_wall": {k: v / wall for k, v in parts.items()} if wall > 0 else {},
            "t_first": recs[0]["t_read"], "t_last": recs[-1]["t_read"],
        })
    if not per_peer:
        return {"per_peer": []}

    def mean(key):
        vals = [x[key] for x in per_peer if _finite(x.get(key))]
        return statistics.fmean(vals) if vals else None

    finals = {(x["final_eval_outer_step"], x["final_eval_loss"]) for x in per_peer}
    at_target = [x["eval_at_target_step"] for x in per_peer]
    eval_target = statistics.fmean(at_target) if all(_finite(e) for e in at_target) else None
    inner = [x["inner_steps"] for x in per_peer]
    bytes_per_round = mean("bytes_per_round")
    return {
        "per_peer": per_peer, "peers_reporting": len(per_peer),
        "util_compute": mean("util_compute"), "util_blocked": mean("util_blocked"),
        "samples_per_s": sum(x["samples_per_s"] for x in per_peer if _finite(x.get("samples_per_s"))),
        "bytes_per_round_per_peer": bytes_per_round,
        "bytes_per_H_per_peer": (statistics.fmean(x["bytes_total"] / x["inner_steps"] for x in per_peer if x["inner_steps"])
                                 * args.inner_steps) if any(inner) else None,
        # the held-out loss after N*H inner steps: at outer step N*fragments on every peer (all equal when the
        # replicas are in sync); where a peer has no such record, the mean of the peers' last finite evals
        "eval_loss": eval_target if eval_target is not None else mean("final_eval_loss"),
        "eval_loss_source": "outer_step == max_outer_steps" if eval_target is not None else "last finite eval",
        "eval_last_record_mean": mean("final_eval_loss"), "eval_same_on_all_peers": len(finals) == 1,
        "eval_at_target_same_on_all_peers": eval_target is not None and len(set(at_target)) == 1,
        "digests_at_target_equal": len({x["digest_at_target_step"] for x in per_peer}) == 1
        and per_peer[0]["digest_at_target_step"] is not None,
        "eval_outer_steps": sorted({x["final_eval_outer_step"] for x in per_peer if x["final_eval_outer_step"] is not None}),
        "inner_steps_per_peer": inner, "rounds_read": [x["records"] for x in per_peer], "rounds_expected": rounds,
        "failed_rounds": sum(x["failed_rounds"] for x in per_peer),
        "mean_round_time": mean("mean_round_time"), "mean_sync_s": mean("mean_sync_s"),
        "t_first": min(x["t_first"] for x in per_peer), "t_last": max(x["t_last"] for x in per_peer),
    }



def fmt(x, spec: str, scale: float = 1.0) -> str:
    return format(x / scale, spec) if _finite(x) else "-"


def print_table(results: list[dict]) -> None:
    head = (f"{'arm':<11} {'link':<8} {'status':<8} {'util':>5} {'util_b':>6} {'samp/s':>7} {'MB/rnd':>7} "
            f"{'MB/H':>6} {'pk MB/s':>7} {'pk mean':>7} {'eval':>7} {'rounds':>6} {'wall s':>6} {'other':>5}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['arm']:<11} {r['link']:<8} {r.get('status', '?'):<8} {fmt(r.get('util_compute'), '.3f'):>5} "
              f"{fmt(r.get('util_blocked'), '.3f'):>6} {fmt(r.get('samples_per_s'), '.1f'):>7} "
              f"{fmt(r.get('bytes_per_round_per_peer'), '.2f', 1e6):>7} {fmt(r.get('bytes_per_H_per_peer'), '.2f', 1e6):>6} "
              f"{fmt(r.get('wire', {}).get('peak_Bps_max'), '.2f', 1e6):>7} "
              f"{fmt(r.get('wire', {}).get('peak_Bps_mean'), '.2f', 1e6):>7} {fmt(r.get('eval_loss'), '.4f'):>7} "
              f"{min(r.get('rounds_read') or [0]):>6} {fmt(r.get('wall_s'), '.0f'):>6} "
              f"{fmt((r.get('cpu') or {}).get('other_cores'), '.2f'):>5}")
        if r.get("status") != "ok" and r.get("error"):
            print(f"  {r['arm']}/{r['link']}: {r['error']}")


def resummarize(path: Path, out: Path) -> int:
    """The summaries of ``path``'s arms computed again from the round records it holds (after a change to
    :func:`summarize`); the wire figures, which need the link samples, are kept as they were."""
    report = json.loads(path.read_text())
    for res in report["results"]:
        settings = argparse.Namespace(**{**report.get("settings", {}), "inner_steps": res["config"]["inner"]["steps"]})
        peers = [types.SimpleNamespace(index=int(name[1:]), records=recs) for name, recs in res["records"].items()]
        res.update(summarize(peers, settings, res["max_outer_steps"], res["fragments"]))
    report["resummarized"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print_table(report["results"])
    return 0
