"""The ``swarmloco monitor`` Textual app, driven headless with Pilot at 80x24."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import socket
import threading
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable, ProgressBar, RichLog, Sparkline, Static

from swarmloco.tui import MonitorApp
from swarmloco.tui.help_screen import HelpScreen
from swarmloco.tui.node_view import NodeView
from swarmloco.tui.sources import NodeSource, RecordedSource, Unreachable, load_recording
from swarmloco.tui.swarm_view import SwarmView, peer_state, swarm_totals

RECORDING = Path(__file__).parent / "fixtures" / "monitor_recording.jsonl"
FRAMES = load_recording(RECORDING)
END = float(FRAMES[-1]["recorded_at"])  # the pinned clock: the last frame's wall time
HAS_SNAPSHOT = importlib.util.find_spec("pytest_textual_snapshot") is not None


def async_test(fn):
    """Run an async test with asyncio.run (no pytest-asyncio/anyio plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def replay_app(*, node: bool = True, swarm: bool = True, **kwargs) -> MonitorApp:
    return MonitorApp(
        RecordedSource(FRAMES, key="status") if node else None,
        RecordedSource(FRAMES, key="peers") if swarm else None,
        clock=lambda: END, refresh_interval=3600, **kwargs,
    )


class FlakySource:
    """Gives its frames, then is unreachable forever."""

    def __init__(self, frames: list[dict]) -> None:
        self.frames = list(frames)

    def fetch(self) -> dict:
        if not self.frames:
            raise Unreachable("connection refused")
        return self.frames.pop(0)


async def settle(app: MonitorApp, pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()


async def poll(app: MonitorApp, pilot, times: int = 1) -> None:
    for _ in range(times):
        await settle(app, pilot)
        app.refresh_data()
        await settle(app, pilot)


def text(app: MonitorApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@async_test
async def test_q_quits() -> None:
    app = replay_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


@async_test
async def test_tab_switches_view() -> None:
    app = replay_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert app.current_view == "node"
        assert app.query_one(NodeView).display and not app.query_one(SwarmView).display
        await pilot.press("tab")
        assert app.current_view == "swarm"
        assert app.query_one(SwarmView).display and not app.query_one(NodeView).display
        await pilot.press("tab")
        assert app.current_view == "node"


@async_test
async def test_swarm_only_starts_on_swarm_view() -> None:
    app = replay_app(node=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert app.current_view == "swarm"


@async_test
async def test_question_mark_opens_help_and_escape_closes() -> None:
    app = replay_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        assert "switch between" in text(app, "#help-text")
        await pilot.press("tab")  # no view switching under the help box
        assert app.current_view == "node"
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


@async_test
async def test_peer_table_from_recorded_stream() -> None:
    app = replay_app(node=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await poll(app, pilot, times=len(FRAMES))  # walk through the whole recording
        table = app.query_one("#swarm-table", DataTable)
        assert table.row_count == 5
        rows = {str(table.get_row_at(i)[0]): [str(c) for c in table.get_row_at(i)]
                for i in range(table.row_count)}
        assert rows["…Kp6nF2Dd"][5] == "stale" and rows["…Kp6nF2Dd"][4] == "29s"
        assert rows["…Xo5iG8Ee"][5] == "joining"
        assert rows["…Xo5iG8Ee"][1] == "gpu-box.example.org:4445"
        assert rows["…iY3hE9Cc"][1] == "192.168.1.7:31337" and rows["…iY3hE9Cc"][2] == "10"
        totals = text(app, "#swarm-totals")
        assert "4 peers online" in totals and "+1 stale" in totals
        assert "4853.6 samples/s" in totals and "step 10" in totals
        assert "round time 11.2s (median over peers)" in totals and "9.6 MB/round" in totals


def test_swarm_totals_and_staleness_are_pure() -> None:
    peers = FRAMES[-1]["peers"]
    assert peer_state(peers[3], END, 10.0) == "stale"
    assert peer_state(peers[3], END, 60.0) == "training"
    assert peer_state({"state": "training"}, END, 10.0) == "stale"  # no heartbeat time
    t = swarm_totals(peers, END, stale_after=60.0)
    assert t["online"] == 5 and t["stale"] == 0
    assert swarm_totals([], END, 10.0)["samples_per_second"] is None


@async_test
async def test_node_view_from_fake_source() -> None:
    app = replay_app(swarm=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await poll(app, pilot, times=len(FRAMES))
        status = FRAMES[-1]["status"]
        header = text(app, "#node-header")
        assert "…ZdUQ4a1A" in header and "run demo" in header and "step 9" in header
        assert "UNREACHABLE" not in header
        bar = app.query_one("#node-progress", ProgressBar)
        assert (bar.progress, bar.total) == (31, 50)
        assert len(app.query_one("#train-spark", Sparkline).data) == len(status["history"])
        assert "compute 10.1s" in text(app, "#node-round")
        assert "14.4 MB" in text(app, "#node-traffic")  # SI: 1 MB = 10^6 bytes
        assert "rss 1.2 GB" in text(app, "#node-device")
        log_text = "\n".join(s.text for s in app.query_one("#node-events", RichLog).lines)
        assert log_text.count("peer_left") == 1  # events are not repeated across polls
        assert "allreduce timed out" in log_text and "outer step 9 done" in log_text
        assert app.title == "swarmloco monitor · demo"


@async_test
async def test_a_node_whose_clock_is_off_shows_it_and_one_in_step_does_not() -> None:
    status = FRAMES[-1]["status"]
    for fields, shown in (({"clock_offset_s": 41.6, "clock_off": True}, "clock 42s behind"),
                          ({"clock_offset_s": -7.2, "clock_off": True}, "clock 7s ahead"),
                          ({"clock_offset_s": -0.3, "clock_off": False}, None)):
        app = MonitorApp(FlakySource([{**status, **fields}]), clock=lambda: END, refresh_interval=3600)
        async with app.run_test(size=(100, 24)) as pilot:
            await poll(app, pilot)
            device = text(app, "#node-device")
            assert (shown in device) if shown else "clock" not in device, device


@async_test
async def test_tolerates_empty_and_partial_status() -> None:
    frames = [{}, {"outer_step": None, "history": [{"train_loss": None}, "junk"],
                   "last_round": {"ok": False, "error": "timeout"}, "events": ["junk", {}]}]
    app = MonitorApp(FlakySource(frames), clock=lambda: END, refresh_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await poll(app, pilot, times=2)
        assert "FAILED" in text(app, "#node-round")
        await pilot.press("tab")  # swarm view without a swarm source
        assert "no swarm source" in text(app, "#swarm-header")


@async_test
async def test_garbage_values_do_not_crash() -> None:
    status = {"outer_step": "x", "history": [{"train_loss": "a"}], "last_round": [],
              "events": None, "inner_step": "3", "inner_steps_per_round": 0, "state": 7,
              "train_loss": float("nan"), "rss_bytes": -1}
    peers = [{"peer_id": None}, "junk", {"peer_id": "a", "time": "x", "maddrs": None},
             {"peer_id": "b", "time": END, "maddrs": "/ip6/::1/tcp/7/p2p/b", "state": None}]
    app = MonitorApp(FlakySource([status]), FlakySource([peers]), clock=lambda: END,
                     refresh_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert app.polls == 1 and app.is_running
        assert "step –" in text(app, "#node-header")
        table = app.query_one("#swarm-table", DataTable)
        assert table.row_count == 3
        assert "[::1]:7" in [str(table.get_row_at(i)[1]) for i in range(3)]


@async_test
async def test_slow_source_does_not_freeze_the_screen() -> None:
    release = threading.Event()

    class SlowSource:
        def fetch(self) -> dict:
            release.wait(10)
            return FRAMES[-1]["status"]

    app = MonitorApp(SlowSource(), refresh_interval=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.3)  # several ticks: still one poll in flight, not a pile of them
        await pilot.press("tab")
        assert app.current_view == "swarm"
        assert len([w for w in app.workers if w.group == "poll"]) == 1
        release.set()
        await settle(app, pilot)
        assert "UQ4a1A" in text(app, "#node-header")


@async_test
async def test_unreachable_node_port() -> None:
    app = MonitorApp(NodeSource(closed_port(), timeout=0.5), refresh_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert "UNREACHABLE" in text(app, "#node-header")
        assert "waiting for data" in text(app, "#node-header")
        assert app.is_running  # and the screen did not die


@async_test
async def test_dead_source_keeps_last_data() -> None:
    app = MonitorApp(FlakySource([FRAMES[-1]["status"]]), clock=lambda: END, refresh_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert "UNREACHABLE" not in text(app, "#node-header")
        await poll(app, pilot, times=2)
        header = text(app, "#node-header")
        assert "UNREACHABLE" in header and "showing last data" in header
        assert "UQ4a1A" in header  # the last status is still on screen
        assert app.query_one("#node-progress", ProgressBar).progress == 31
        log_text = "\n".join(s.text for s in app.query_one("#node-events", RichLog).lines)
        assert log_text.count("node unreachable") == 1


def test_node_source_reads_status_server() -> None:
    from swarmloco.app.status_server import StatusServer

    with StatusServer(lambda: FRAMES[0]["status"], port=0) as server:
        source = NodeSource(server.port)
        assert source.fetch()["outer_step"] == 7
    with pytest.raises(Unreachable):
        NodeSource(closed_port(), timeout=0.5).fetch()


def test_recorded_source_replay_and_rebase(tmp_path: Path) -> None:
    src = RecordedSource.from_file(RECORDING, key="peers")
    assert len(src) == 3
    assert [src.fetch()[0]["outer_step"] for _ in range(4)] == [7, 8, 9, 9]  # sticks at the end
    shifted = RecordedSource(FRAMES, key="peers", clock=lambda: END + 100).fetch()
    assert shifted[0]["time"] == pytest.approx(FRAMES[0]["peers"][0]["time"] + END + 100
                                               - FRAMES[0]["recorded_at"])
    as_json = tmp_path / "rec.json"
    as_json.write_text('[{"peers": []}, {"other": 1}]')
    src = RecordedSource.from_file(as_json, key="peers", loop=True)
    assert src.fetch() == []
    with pytest.raises(Unreachable):
        src.fetch()
    assert src.fetch() == []


@pytest.mark.parametrize("view", ["node", "swarm"])
@async_test
async def test_screenshot_renders_key_text(tmp_path: Path, view: str) -> None:
    app = replay_app(initial_view=view)
    async with app.run_test(size=(80, 24)) as pilot:
        await poll(app, pilot, times=len(FRAMES))
        name = app.save_screenshot(f"{view}.svg", str(tmp_path))
    svg = (tmp_path / f"{view}.svg").read_text().replace("&#160;", " ")
    assert Path(name).name == f"{view}.svg" and svg.startswith("<svg")
    expected = ["UQ4a1A", "events", "compute"] if view == "node" else ["stale", "peers online"]
    for fragment in expected:
        assert fragment in svg


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch):
    """Event times are local; pin the zone so snapshots match everywhere."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.skipif(not HAS_SNAPSHOT, reason="pytest-textual-snapshot not installed")
@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("view", ["node", "swarm"])
def test_snapshot(snap_compare, utc, view: str, size: tuple[int, int]) -> None:
    app = replay_app(initial_view=view)

    async def run_before(pilot) -> None:
        await poll(app, pilot, times=len(FRAMES))

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("node,swarm", [(False, True), (True, False)])
@async_test
async def test_a_view_without_a_source_says_so_and_is_no_failure(node: bool, swarm: bool) -> None:
    app = replay_app(node=node, swarm=swarm)
    async with app.run_test(size=(80, 24)) as pilot:
        await poll(app, pilot)
        await pilot.press("tab")
        await poll(app, pilot)
        empty = "#node-header" if not node else "#swarm-header"
        shown = text(app, empty)
        assert ("no node source" if not node else "no swarm source") in shown and "UNREACHABLE" not in shown
        log_text = "\n".join(s.text for s in app.query_one("#node-events", RichLog).lines)
        assert "unreachable" not in log_text


@pytest.mark.parametrize("attached,says", [(None, "the node keeps training"), ("node", "stop the node"),
                                           ("demo", "stop the demo")])
@async_test
async def test_the_help_and_the_footer_say_what_q_does_in_each_mode(attached, says) -> None:
    app = replay_app(attached=attached)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        assert says in text(app, "#help-text")
        await pilot.press("escape")
        await pilot.pause()
        footer = {b.description for _, b, _, _ in app.active_bindings.values() if b.key == "q"}
        assert footer == {MonitorApp.QUIT_LABELS[attached]}
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


@async_test
async def test_ctrl_c_quits_like_q() -> None:
    app = replay_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert not app.is_running


@async_test
async def test_a_node_that_stopped_shows_stopped_not_unreachable() -> None:
    finished = {**FRAMES[-1]["status"], "state": "stopped"}
    app = MonitorApp(FlakySource([finished]), clock=lambda: END, refresh_interval=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await poll(app, pilot, times=2)  # its last state, then its endpoint is gone
        header = text(app, "#node-header")
        assert "STOPPED" in header and "UNREACHABLE" not in header and "…ZdUQ4a1A" in header
        log_text = "\n".join(s.text for s in app.query_one("#node-events", RichLog).lines)
        assert "the node has stopped" in log_text and "unreachable" not in log_text


@async_test
async def test_the_loss_chart_has_a_labelled_scale() -> None:
    app = replay_app(swarm=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await poll(app, pilot, times=len(FRAMES))
        history = FRAMES[-1]["status"]["history"]
        for name in ("train", "eval"):
            losses = [h[f"{name}_loss"] for h in history]
            label = text(app, f"#{name}-label")
            assert f"{max(losses):.3f} top" in label and f"{min(losses):.3f} bottom" in label, label
            assert f"steps {history[0]['outer_step']}–{history[-1]['outer_step']}" in label


def test_units_peer_ids_and_round_time_are_one_system() -> None:
    from swarmloco.app.console import format_round_line
    from swarmloco.display import fmt_bytes, round_parts
    from swarmloco.app.demo import format_step_line
    from swarmloco.tui import fmt
    from swarmloco.tui.node_view import round_time

    assert fmt.human_bytes(2_600_000) == fmt_bytes(2_600_000) == "2.6 MB"  # SI everywhere, MB = 10^6 bytes
    assert fmt.human_bytes(999) == "999 B" and fmt.human_bytes(1_234_567_890) == "1.2 GB"
    peer_id = FRAMES[-1]["status"]["peer_id"]
    assert fmt.short_peer_id(peer_id) == "…" + peer_id[-8:]  # the 8 characters logs and events use
    last = {"outer_step": 3, "compute_s": 5.0, "barrier_s": 1.0, "matchmaking_s": 0.5, "allreduce_s": 0.25}
    parts = round_parts(last, 7.0)
    assert parts == {"compute": 5.0, "wait": 1.0, "averaging": 0.75, "other": 0.25} and sum(parts.values()) == 7.0
    assert round_time({"last_round": last, "last_round_time": 7.0}) == 7.0  # the monitor's round time
    record = {"outer_step": 3, "ok": True, "train_loss": 2.0, "eval_loss": 2.5, "peers": 2, "bytes_sent": 2_600_000,
              "bytes_received": 2_600_000, "round_time": 7.0, "digest": "d"}
    assert "round 7.0s (compute 5.0, wait 1.0, averaging 0.8, other 0.2)" in format_round_line(record, last)
    assert "sent 2.6 MB recv 2.6 MB" in format_round_line(record, last)
    assert "round 7.0s" in format_step_line(3, [record], 2) and "sent 2.6 MB" in format_step_line(3, [record], 2)
