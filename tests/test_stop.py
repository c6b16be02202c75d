"""Stops the way they happen: a signal to the whole process group (a terminal's Ctrl-C, closing it,
``kill -- -PGID``, a supervisor), on a loaded machine, in the middle of a round, once or twice.

Each command runs in its own session, as a terminal would hold it, and the test signals its group
with ``os.killpg``. What must hold: exit 0 within :data:`STOP_BOUND` seconds, at most one line printed
after the signal, the checkpoint written, and no process of the session left (hivemind's DHT and
averager processes, p2pd); a second signal exits at once (130).
"""

from __future__ import annotations

import os
import pty
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tmpfs
from peers import PeerProcess
from swarmloco.node.checkpoint import list_checkpoints
from swarmloco.protocol.processes import session_processes, signal_session

pytestmark = pytest.mark.slow

STOP_BOUND = 20.0
"""Seconds from the signal to the exit (docs/operating.md, "Stopping"); a round in flight adds up to 5 s."""


def gone_within(pid: int, seconds: float) -> list[int]:
    """The processes of session ``pid`` still alive after waiting up to ``seconds`` for them to go."""
    deadline = time.monotonic() + seconds
    while (left := session_processes(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def wait_for_line(peer: PeerProcess, offset: int, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in peer.log_since(offset)):
        assert time.monotonic() < deadline, f"{peer.name}: no {text!r} line:\n{peer.log_text()}"
        time.sleep(0.02)


@pytest.fixture
def cpu_hog():
    """A busy process beside the test: stops are tested on a loaded machine."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield hog
    hog.kill()
    hog.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_any_signal_to_the_group_stops_a_peer_cleanly_and_one_trains_on_through_a_full_disk(
        spawn, write_config, tmp_path, cpu_hog) -> None:
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    port = free_port()  # one of them on a fixed port, as configs/small.toml used to put every peer
    # the SIGHUP peer checkpoints onto a disk with room for one checkpoint of the tiny model (~1.1 MB)
    disk = tmpfs(tmp_path / "disk", "1500k")
    dirs = {sig: tmp_path / sig.name for sig in sigs} | ({signal.SIGHUP: disk} if disk is not None else {})
    configs = {sig: write_config(f"{sig.name}.toml", checkpoint={"dir": str(dirs[sig])},
                                 swarm={"host_maddrs": [f"/ip4/127.0.0.1/tcp/{port if sig == signal.SIGINT else 0}"]})
               for sig in sigs}
    try:
        peers = {sig: spawn(sig.name, configs[sig], verbose=False) for sig in sigs}
        for peer in peers.values():
            peer.maddrs()
        # a second peer on that port is refused in one line (p2pd reuses ports: it would have started a
        # second swarm on the same port without a word)
        second = spawn("second", configs[signal.SIGINT], verbose=False)
        assert second.wait(60) == 1
        lines = second.log_text().strip().splitlines()
        assert len(lines) == 1 and f"port {port} is taken" in lines[0] and "--host-maddrs" in lines[0], lines
        for peer in peers.values():
            [peer.next_round() for _ in range(2)]
            assert len(peer.session_processes()) >= 3, "expected hivemind's helpers and p2pd beside the peer"
        if disk is not None:  # its second checkpoint did not fit: one line, and it trains on
            full = peers[signal.SIGHUP]
            events = [full.wait_event("checkpoint", timeout=60)["message"] for _ in range(2)]
            assert events[0].startswith("wrote") and events[1].startswith("FAILED"), events
            assert full.next_round()["ok"]
            failed = [line for line in full.log_since(0) if "could not write checkpoint" in line]
            assert failed and all("no space left" in line.lower() for line in failed), failed
        marks, started = {}, {}
        for sig, peer in peers.items():  # the same moment for all three: mid-training, on a loaded machine
            marks[sig], started[sig] = peer.log_size(), time.monotonic()
            peer.signal_group(sig)
        for sig, peer in peers.items():
            assert peer.wait(STOP_BOUND) == 0, peer.log_text()
            took = time.monotonic() - started[sig]
            after = [line for line in peer.log_since(marks[sig]) if "could not write checkpoint" not in line
                     or sig != signal.SIGHUP]  # (the full disk's last checkpoint fails too: it says so)
            assert len(after) == 1 and f"{sig.name} received, stopping cleanly" in after[0], after
            assert gone_within(peer.proc.pid, 5.0) == [], f"{sig.name}: processes outlived the peer"
            saved = list_checkpoints(dirs[sig])
            last = max(r["outer_step"] for r in peer.rounds)
            if dirs[sig] is disk:  # the one that fit is intact, and no temp file is left
                assert saved and not [p for p in disk.iterdir() if p.name.startswith(".tmp-")]
            else:
                assert saved and saved[-1].outer_step >= last, (sig.name, saved)  # written on exit
            log = "\n".join(peer.log_since(0))
            assert "starting a new swarm" in log and "outer   1 | train" in log  # the run talks
            assert "Traceback" not in log and "WARN" not in log, log  # no warnings of our own defaults
            print(f"{sig.name}: exit 0 after {took:.1f}s")
    finally:
        if disk is not None:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_peer_stopped_in_the_middle_of_a_round_leaves_it_and_a_second_signal_exits_at_once(
        spawn, write_config, tmp_path) -> None:
    config = write_config(swarm={"min_peers": 3, "heartbeat_period": 0.5, "heartbeat_ttl": 3.0})
    first = spawn("a", config)
    hang = {"SWARMLOCO_FAULT": "hang_allreduce:1"}  # both hang as reducers in their first all-reduce
    once = spawn("once", config, initial_peers=first.maddrs(), env=hang, verbose=False)
    twice = spawn("twice", config, initial_peers=first.maddrs(), env=hang, verbose=False)
    for peer in (once, twice):
        peer.wait_event("fault", timeout=120)  # the moment: this peer is inside the all-reduce

    mark_once, mark_twice, t0 = once.log_size(), twice.log_size(), time.monotonic()
    once.signal_group(signal.SIGTERM)
    twice.signal_group(signal.SIGINT)
    wait_for_line(twice, mark_twice, "SIGINT received")
    t1 = time.monotonic()
    twice.signal_group(signal.SIGINT)
    assert twice.wait(5) == 130 and time.monotonic() - t1 < 3.0, twice.log_text()
    assert gone_within(twice.proc.pid, 3.0) == [], "a second signal must not leave hivemind's processes behind"

    assert once.wait(STOP_BOUND) == 0, once.log_text()  # it left the round (after the grace, or once it failed)
    took = time.monotonic() - t0
    after = once.log_since(mark_once)
    assert len(after) == 1 and "SIGTERM received" in after[0], after
    assert gone_within(once.proc.pid, 5.0) == []
    # the survivor goes on alone
    # ("twice" left no "stopped" heartbeat: until its last one expires, a round alone has no quorum)
    alone, deadline = [first.next_round(timeout=120)], time.monotonic() + 60
    while not (alone[-1]["ok"] and alone[-1]["peers"] == 1) and time.monotonic() < deadline:
        alone.append(first.next_round(timeout=120))
    assert alone[-1]["ok"] and alone[-1]["peers"] == 1, [(r["ok"], r["peers"], r["error"]) for r in alone]
    print(f"mid-round stop: exit 0 after {took:.1f}s")


class Terminal:
    """A pty for a program that draws a screen (the monitor); what it draws is collected as it comes."""

    def __init__(self, rows: int = 30, cols: int = 100):
        import fcntl
        import struct
        import termios
        import threading

        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.screen = bytearray()
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        import select

        while not self._closed:
            try:
                if select.select([self.master], [], [], 0.1)[0]:
                    self.screen += os.read(self.master, 65536)
            except OSError:
                return

    def wait_for(self, needle: bytes, timeout: float, since: int = 0) -> int:
        """Wait until ``needle`` is drawn (after offset ``since``); returns the offset after it."""
        deadline = time.monotonic() + timeout
        while (at := bytes(self.screen).find(needle, since)) < 0:
            assert time.monotonic() < deadline, f"{needle!r} never drawn: {bytes(self.screen[-1500:])!r}"
            time.sleep(0.05)
        return at + len(needle)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        self._closed = True
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


def _session(cmd: list[str], *, terminal: Terminal | None = None, env: dict | None = None):
    """Start ``cmd`` in its own session (on ``terminal``, if given: Textual draws on stderr)."""
    fd = terminal.slave if terminal is not None else None
    return subprocess.Popen(cmd, stdin=fd if fd is not None else subprocess.DEVNULL,
                            stdout=fd if fd is not None else subprocess.PIPE,
                            stderr=fd if fd is not None else subprocess.PIPE,
                            start_new_session=True, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color", **(env or {})})


@pytest.fixture
def reaper():
    procs: list[subprocess.Popen] = []
    yield procs.append
    for p in procs:
        signal_session(p.pid, signal.SIGKILL)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


def test_demo_and_demo_tui_stop_cleanly_and_quitting_the_monitor_stops_the_demo(write_config, tmp_path,
                                                                               reaper) -> None:
    config = write_config()
    demo = [sys.executable, "-m", "swarmloco", "demo", "--peers", "1", "--config", str(config), "--inner-steps", "4"]
    plain = _session([*demo, "--outer-steps", "200"])
    term = Terminal()
    tui = _session([*demo, "--outer-steps", "6", "--tui", "--workdir", str(tmp_path / "tui")], terminal=term,
                   env={"SWARMLOCO_FAULT": "slow_steps:0.25"})  # (long enough for its monitor to watch it)
    reaper(plain), reaper(tui)
    try:
        for line in plain.stdout:  # the plain demo trains; Ctrl-C from its terminal (the whole group)
            if line.startswith("outer   1"):
                break
        t0 = time.monotonic()
        os.killpg(plain.pid, signal.SIGINT)
        assert plain.wait(STOP_BOUND + 10) == 0
        err = plain.stderr.read().strip().splitlines()
        assert len(err) == 1 and "SIGINT received, stopping every peer cleanly" in err[0], err
        rest = plain.stdout.read().splitlines()  # (step lines printed before the signal may still be in the pipe)
        assert all(line.startswith("outer ") for line in rest), rest
        assert gone_within(plain.pid, 5.0) == [], "a peer or its helpers outlived the demo"
        print(f"demo: exit 0 after {time.monotonic() - t0:.1f}s")

        # the --tui demo finishes its steps: the monitor shows its node as stopped, not UNREACHABLE
        out, deadline = tmp_path / "tui" / "demo.out", time.monotonic() + 180
        while not (out.exists() and "finished" in out.read_text()):
            assert tui.poll() is None and time.monotonic() < deadline, out.read_text() if out.exists() else "no demo.out"
            time.sleep(0.2)
        term.wait_for(b"STOPPED", 30)
        assert b"UNREACHABLE" not in bytes(term.screen)
        term.type(b"q")  # quitting the monitor ends the demo: exit 0, nothing left
        assert tui.wait(30) == 0, bytes(term.screen[-3000:])
        assert gone_within(tui.pid, 5.0) == [], "the monitor's DHT node or p2pd outlived the demo"
    finally:
        term.close()


def test_monitor_init_run_and_bootstrap_stop_cleanly_on_a_group_signal(tmp_path, write_config, reaper) -> None:
    from swarmloco.protocol.identity import Identity

    key = tmp_path / "owner.key"
    Identity.generate().write_libp2p_key(key)
    swarmloco = [sys.executable, "-m", "swarmloco"]
    loopback = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    boot = _session([*swarmloco, "bootstrap", *loopback, "--maddrs-file", str(tmp_path / "boot.maddrs")])
    reaper(boot)
    maddr = _file_line(tmp_path / "boot.maddrs", boot)
    owner = _session([*swarmloco, "init-run", str(write_config()), "--identity", str(key), *loopback,
                      "--initial-peers", maddr, "--maddrs-file", str(tmp_path / "owner.maddrs")])
    reaper(owner)
    _file_line(tmp_path / "owner.maddrs", owner)
    term = Terminal()
    monitor = _session([*swarmloco, "monitor", "--initial-peers", maddr, "--run", "test"], terminal=term)
    reaper(monitor)
    try:
        term.wait_for(b"swarm view", 60)
        assert len(session_processes(monitor.pid)) >= 3  # the monitor, its DHT process and p2pd
        for proc, sig in ((monitor, signal.SIGTERM), (owner, signal.SIGINT), (boot, signal.SIGHUP)):
            name, t0 = proc.args[3], time.monotonic()
            os.killpg(proc.pid, sig)
            assert proc.wait(STOP_BOUND) == 0, bytes(term.screen[-3000:]) if proc is monitor else proc.stderr.read()
            assert gone_within(proc.pid, 5.0) == [], f"processes outlived {name}"
            if proc is not monitor:  # (the monitor draws its screen on stderr)
                err = proc.stderr.read().strip().splitlines()
                after = err[next(i for i, e in enumerate(err) if "received" in e):]
                assert len(after) == 1 and f"{sig.name} received, stopping" in after[0], err
                assert not [e for e in err if "Traceback" in e or "WARN" in e], err
            print(f"{name}: exit 0 after {time.monotonic() - t0:.1f}s")
    finally:
        term.close()


def _file_line(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    return path.read_text().split()[0]
