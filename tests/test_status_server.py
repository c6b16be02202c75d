"""The node's local status endpoint: /status JSON, /metrics Prometheus text, errors, binding."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from swarmloco.app.metrics import escape_label_value, render_metrics
from swarmloco.app.status_server import StatusServer
from swarmloco.tui.sources import load_recording

RECORDING = Path(__file__).parent / "fixtures" / "monitor_recording.jsonl"
SAMPLE_LINE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})?'
    r' (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))$'
)


@pytest.fixture
def status() -> dict:
    return load_recording(RECORDING)[-1]["status"]


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    samples = {}
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("#"):
            assert line.startswith("# HELP "), line
            continue
        m = SAMPLE_LINE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        assert m["name"] in types, f"{m['name']} has no TYPE line before it"
        samples[(m["name"], m["labels"] or "")] = float(m["value"])
    return samples


def test_status_json_roundtrip(status: dict) -> None:
    with StatusServer(lambda: status, port=0) as server:
        assert server.port > 0
        code, ctype, body = get(f"{server.url}/status")
    assert code == 200 and ctype.startswith("application/json")
    assert json.loads(body) == status


def test_status_nan_becomes_null() -> None:
    with StatusServer(lambda: {"train_loss": float("nan"), "x": [float("inf")]}, port=0) as s:
        code, _, body = get(f"{s.url}/status")
    assert code == 200 and json.loads(body) == {"train_loss": None, "x": [None]}


def test_metrics_parse(status: dict) -> None:
    with StatusServer(lambda: status, port=0) as server:
        code, ctype, body = get(f"{server.url}/metrics")
    assert code == 200 and "version=0.0.4" in ctype
    samples = parse_metrics(body)
    assert samples[("swarmloco_outer_step", "")] == status["outer_step"]
    assert samples[("swarmloco_train_loss", "")] == pytest.approx(status["train_loss"])
    assert samples[("swarmloco_bytes_sent_total", "")] == status["bytes_sent_total"]
    assert samples[("swarmloco_round_phase_seconds", 'phase="compute"')] == 10.1
    assert samples[("swarmloco_round_phase_seconds", 'phase="outer_step"')] == 0.02
    assert samples[("swarmloco_rounds_total", 'result="ok"')] == status["rounds_ok"]
    assert samples[("swarmloco_rounds_total", 'result="failed"')] == status["rounds_failed"]
    assert samples[("swarmloco_peers_in_round", "")] == 4
    assert samples[("swarmloco_peers_online", "")] == 4
    assert "# TYPE swarmloco_bytes_received_total counter" in body
    assert "# HELP swarmloco_samples_per_second " in body
    # cuda_allocated_bytes is None in the fixture: left out entirely, HELP/TYPE included
    assert "swarmloco_cuda_allocated_bytes" not in body


def test_metrics_tolerates_missing_none_nan() -> None:
    assert render_metrics({}) == ""
    text = render_metrics({"outer_step": 2, "train_loss": float("nan"), "eval_loss": None,
                           "last_round": {"compute_s": 1.5, "allreduce_s": None},
                           "rounds_ok": True, "history": "garbage"})
    samples = parse_metrics(text)
    assert set(samples) == {("swarmloco_outer_step", ""),
                            ("swarmloco_round_phase_seconds", 'phase="compute"')}
    assert "nan" not in text.lower()


def test_metrics_label_escaping() -> None:
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    text = render_metrics({"run_id": 'we"ird\\run\nx', "outer_step": 1})
    samples = parse_metrics(text)
    assert ("swarmloco_node_info", 'run_id="we\\"ird\\\\run\\nx"') in samples


def test_unknown_path_is_404(status: dict) -> None:
    with StatusServer(lambda: status, port=0) as server:
        for path in ("/", "/nope", "/status/extra"):
            code, _, _ = get(f"{server.url}{path}")
            assert code == 404


def test_raising_get_status_is_500_and_server_survives() -> None:
    calls = {"n": 0}

    def flaky() -> dict:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom\nsecond line")
        return {"outer_step": 5}

    with StatusServer(flaky, port=0) as server:
        code, ctype, body = get(f"{server.url}/status")
        assert code == 500 and ctype.startswith("application/json")
        assert "\n" not in body.strip()
        assert "boom" in json.loads(body)["error"]
        code, _, body = get(f"{server.url}/status")
        assert code == 200 and json.loads(body) == {"outer_step": 5}
        calls["n"] = 0
        assert get(f"{server.url}/metrics")[0] == 500
        assert get(f"{server.url}/metrics")[0] == 200


def _non_loopback_ipv4() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for UDP connect
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_binds_loopback_only() -> None:
    with StatusServer(lambda: {}, port=0) as server:
        assert server.host == "127.0.0.1"
        assert server._server is not None and server._server.server_address[0] == "127.0.0.1"
        ip = _non_loopback_ipv4()
        if ip is not None:
            with pytest.raises(OSError):
                socket.create_connection((ip, server.port), timeout=2).close()


def test_close_frees_port_and_requests_are_not_printed(capfd: pytest.CaptureFixture) -> None:
    server = StatusServer(lambda: {}, port=0)
    server.start()
    port = server.port
    assert get(f"{server.url}/status")[0] == 200
    server.close()
    server.close()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    out, err = capfd.readouterr()
    assert "GET /status" not in err and "GET /status" not in out
