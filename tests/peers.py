"""Real peer processes for tests: start, read their round events, stop, and always reap them."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from swarmloco.protocol.processes import session_processes, signal_session

PREFIX = "@@swarmloco "


class PeerProcess:
    """`python -m swarmloco run ...` (or ``command``: join, init-run) in its own session, with its JSON
    events in a queue. ``config`` None: the command takes no config file (join: pass MADDR in ``args``).
    ``verbose``: run with ``-v`` (info logs in the log file, for debugging a failure); without it the log
    holds exactly what an operator's console shows."""

    def __init__(self, name: str, config: Path | None, workdir: Path, *args: str, initial_peers: list[str] = (),
                 env: dict[str, str] | None = None, command: str = "run", verbose: bool = True):
        self.name = name
        self.maddrs_file = workdir / f"{name}.maddrs"
        self.log_path = workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "swarmloco", *(["-v"] if verbose else []), command,
               *([str(config)] if config is not None else []),
               *(["--json-events"] if command in ("run", "join") else []), "--maddrs-file", str(self.maddrs_file),
               *args]
        for m in initial_peers:
            cmd += ["--initial-peers", m]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     start_new_session=True)
        self.events: queue.Queue = queue.Queue()
        self.rounds: list[dict] = []
        self.seen: list[dict] = []  # events passed over while waiting for something else
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                try:
                    self.events.put(json.loads(line[len(PREFIX):]))
                except json.JSONDecodeError:
                    pass
        self.events.put({"type": "exit"})

    def maddrs(self, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while not self.maddrs_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text(4000)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not publish its address in {timeout}s:\n{self.log_text(4000)}")
            time.sleep(0.05)
        return [m for m in self.maddrs_file.read_text().split() if m]

    def next_round(self, timeout: float = 120.0) -> dict:
        """The next round summary this peer reports (raises on exit or timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no round in {timeout}s:\n{self.log_text(4000)}")
            try:
                ev = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if ev.get("type") == "exit":
                raise RuntimeError(f"{self.name} exited ({self.proc.poll()}) before its next round:\n{self.log_text(4000)}")
            if ev.get("type") == "round":
                self.rounds.append(ev)
                return ev
            self.seen.append(ev)

    def wait_event(self, kind: str, timeout: float = 120.0) -> dict:
        """The next ``{"type": "event", "kind": kind}`` line (rounds read meanwhile go to ``rounds``)."""
        for ev in self.seen:
            if ev.get("kind") == kind:
                self.seen.remove(ev)
                return ev
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no {kind!r} event in {timeout}s:\n{self.log_text(4000)}")
            try:
                ev = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if ev.get("type") == "exit":
                raise RuntimeError(f"{self.name} exited ({self.proc.poll()}) before a {kind!r} event:\n{self.log_text(4000)}")
            if ev.get("type") == "round":
                self.rounds.append(ev)
            elif ev.get("kind") == kind:
                return ev
            else:
                self.seen.append(ev)

    def signal_session(self, sig: int) -> None:
        """Signal every process of the peer (a frozen or powered-off machine, not just the main process;
        hivemind's helpers lead process groups of their own, so this goes by session)."""
        signal_session(self.proc.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Signal the peer's process group, as a terminal's Ctrl-C, closing it, or ``kill -- -PGID`` do."""
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log_size(self) -> int:
        self.log.flush()
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> list[str]:
        """Lines the peer wrote to its log (stderr) after ``offset`` (from :meth:`log_size`)."""
        self.log.flush()
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()

    def log_text(self, tail: int | None = None) -> str:
        """The peer's log (stderr): all of it, or its last ``tail`` characters (for error messages)."""
        self.log.flush()
        text = self.log_path.read_text()
        return text[-tail:] if tail else text

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def session_processes(self) -> list[int]:
        """PIDs still alive in this peer's session (the peer, hivemind's helpers, p2pd)."""
        return session_processes(self.proc.pid)

    def kill(self) -> None:
        signal_session(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
