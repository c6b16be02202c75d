"""hivemind's helper processes: out of the caller's process group, dying with it, reaped when it leaves.

A peer runs hivemind's DHT process (which starts the ``p2pd`` daemon) and its averager process. A terminal's
Ctrl-C or SIGHUP, ``kill -TERM -- -PGID``, ``timeout`` and most supervisors signal the whole foreground
process group; helpers that got those signals (p2pd handles SIGTERM itself) would die before the peer left
the swarm, and the peer would block in its last DHT store. So:

* every Python-level fork inside :func:`isolated_helpers` puts the child in a process group of its own
  (``setpgid``) with ``PR_SET_PDEATHSIG`` = SIGKILL (Linux). The DHT process inherits the hook when it starts
  p2pd (uvloop runs Python's fork hooks), so p2pd too leads its own group and dies with it. Group signals
  reach only the peer, which stops its helpers in order; a peer killed outright takes them all with it;
* :func:`reap_helpers` SIGKILLs whatever is left of those groups; the transport calls it after its shutdown,
  the second-signal path before ``os._exit``, and ``atexit`` at the end.

Only processes of this session and of a group we created are signalled (a reused pid is left alone).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterable

logger = logging.getLogger(__name__)

_registered = False
_active = 0  # > 0 inside isolated_helpers(): forks made now are helpers
_groups: set[int] = set()  # process groups of our helpers (each helper leads its own)


@contextlib.contextmanager
def isolated_helpers():
    """Processes forked inside this block lead their own process group and die with us; on the way out,
    the caller passes their pids to :func:`track`. Forks outside it are left as they are."""
    global _active
    _register()
    _active += 1
    try:
        yield
    finally:
        _active -= 1


def _register() -> None:
    global _registered
    if _registered or not hasattr(os, "register_at_fork"):
        return
    _registered = True
    libc = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            libc = None
    forking = [0]

    def before() -> None:
        forking[0] = os.getpid()

    def in_child() -> None:
        if not _active:
            return
        try:
            os.setpgid(0, 0)  # out of the terminal's / supervisor's process group
        except OSError:
            pass
        if libc is not None:
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != forking[0]:  # the parent died between fork and prctl
                os._exit(1)
        # a handler of the parent (its clean stop) means nothing here: default SIGTERM/SIGHUP (the parent
        # stops us in order; a direct signal still ends us), ignore SIGINT as hivemind does
        for sig, how in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGHUP, signal.SIG_DFL),
                         (signal.SIGINT, signal.SIG_IGN)):
            try:
                signal.signal(sig, how)
            except (OSError, ValueError):
                pass

    os.register_at_fork(before=before, after_in_child=in_child)
    atexit.register(reap_helpers)


def track(pids: Iterable[int | None]) -> None:
    """Remember helper processes (forked inside :func:`isolated_helpers`): :func:`reap_helpers` clears
    their groups."""
    for pid in pids:
        if pid:
            _groups.add(int(pid))


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` that belong to this session (Linux /proc; else [])."""
    try:
        sid = os.getsid(0)
        entries = os.listdir("/proc")
    except OSError:
        return []
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if pgrp == pgid and session == sid and state != "Z" and pid != os.getpid():
            members.append(pid)
    return members


def reap_helpers(pgids: Iterable[int] | None = None) -> int:
    """SIGKILL every process left in our helpers' groups (``pgids``: only those); returns how many."""
    killed = 0
    for pgid in sorted(_groups if pgids is None else set(pgids) & _groups):
        members = group_members(pgid)
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        if not members:
            _groups.discard(pgid)  # gone: never signal that number again
    return killed


def signal_session(sid: int, sig: int) -> list[int]:
    """Send ``sig`` to every process of session ``sid`` (a child started with ``start_new_session``: the
    peer and all its helpers, whatever their process group); returns the pids signalled."""
    hit = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc: at least the session leader's group
        try:
            os.killpg(sid, sig)
        except OSError:
            pass
        return hit
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) == sid and pid != os.getpid():
                os.kill(pid, sig)
                hit.append(pid)
        except OSError:
            continue
    return hit


def session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    alive = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return alive
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(int(entry))
        except OSError:
            continue
    return alive


__all__ = ["group_members", "isolated_helpers", "reap_helpers", "session_processes", "signal_session", "track"]
