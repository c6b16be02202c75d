"""A newcomer is not turned away because its bootstrap peer does not answer yet: it waits, says so, and joins."""

from __future__ import annotations

import random
import socket
import time

import pytest

from swarmloco.protocol.bootstrap import Stopped, retry_delay, start_with_retries
from swarmloco.protocol.identity import Identity

REFUSED = RuntimeError("Daemon failed to start: 2026/12/07 failed to connect to bootstrap peers")


class FakeWait:
    """A stop event whose waits only move a fake clock (no test sleeps); ``stop_after`` waits it is set."""

    def __init__(self, stop_after: int | None = None):
        self.now, self.waits, self.stop_after = 0.0, [], stop_after

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return self.stop_after is not None and len(self.waits) >= self.stop_after


def failing(times: int, error: BaseException = REFUSED):
    calls = []

    def start():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "started"

    return start, calls


def test_a_start_refused_by_silent_initial_peers_is_tried_again_with_growing_jittered_waits() -> None:
    fake = FakeWait()
    start, calls = failing(4)
    result = start_with_retries(start, initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/x"], timeout=120, stop=fake,
                                rng=random.Random(0), clock=fake.clock)
    assert result == "started" and len(calls) == 5
    assert len(fake.waits) == 4 and all(base / 2 <= w <= base for w, base in zip(fake.waits, (1, 2, 4, 8)))


def test_a_start_gives_up_with_the_last_error_when_the_time_is_up() -> None:
    fake = FakeWait()
    start, calls = failing(1000)
    with pytest.raises(RuntimeError, match="bootstrap peers"):
        start_with_retries(start, initial_peers=["m"], timeout=60, stop=fake, rng=random.Random(1), clock=fake.clock)
    assert fake.now <= 60 and len(calls) == len(fake.waits) + 1 and len(calls) >= 5


@pytest.mark.parametrize("error,peers,timeout", [(OSError("Address already in use"), ["m"], 120), (REFUSED, [], 120),
                                                 (REFUSED, ["m"], 0)],
                         ids=["another-error", "no-initial-peers", "timeout-0"])
def test_other_errors_a_new_swarm_and_timeout_0_are_not_retried(error, peers, timeout) -> None:
    fake = FakeWait()
    start, calls = failing(1, error)
    with pytest.raises(type(error)):
        start_with_retries(start, initial_peers=peers, timeout=timeout, stop=fake, clock=fake.clock)
    assert len(calls) == 1 and not fake.waits


def test_a_stop_during_the_wait_ends_it_at_once() -> None:
    fake = FakeWait(stop_after=2)
    start, calls = failing(1000)
    with pytest.raises(Stopped):
        start_with_retries(start, initial_peers=["m"], timeout=120, stop=fake, clock=fake.clock)
    assert len(calls) == 2


def test_retry_delays_grow_to_a_cap_and_are_jittered() -> None:
    rng = random.Random(3)
    delays = [retry_delay(a, rng) for a in range(12)]
    assert all(0.5 * min(15, 2 ** a) <= d <= min(15, 2 ** a) for a, d in enumerate(delays))
    assert len({round(d, 6) for d in delays[5:]}) > 1  # capped waits still differ: newcomers spread out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_newcomer_waits_for_a_bootstrap_peer_that_starts_late_and_then_trains(spawn, write_config, tmp_path) -> None:
    """The bootstrap peer is not up when the newcomer starts (its dial is refused): the newcomer says it waits,
    and once the bootstrap peer is up, joins through it and trains (exit 0), instead of exiting 1."""
    key = tmp_path / "boot.key"
    boot_id = Identity.generate()
    boot_id.write_libp2p_key(str(key))
    port = _free_port()
    maddr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot_id.libp2p_peer_id()}"
    newcomer = spawn("newcomer", write_config(), "--max-outer-steps", "1", initial_peers=[maddr])
    deadline = time.monotonic() + 90
    while "initial peer(s) answered; trying again" not in newcomer.log_text():
        assert newcomer.proc.poll() is None, f"the newcomer gave up:\n{newcomer.log_text(3000)}"
        assert time.monotonic() < deadline, f"the newcomer never said it waits:\n{newcomer.log_text(3000)}"
        time.sleep(0.1)
    spawn("boot", None, "--identity", str(key), "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", command="bootstrap")
    assert newcomer.next_round(timeout=150)["ok"]
    assert newcomer.wait(60) == 0, newcomer.log_text(3000)
    log = newcomer.log_text()
    assert "could not start" not in log and "Traceback" not in log
