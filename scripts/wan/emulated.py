"""An emulated WAN on one machine, for ``scripts/bench_wan.py``: network namespaces, ``tc tbf`` and NFQUEUE delay.

The recipe of /work/shared/wan: one namespace per peer with a veth to a bridge in a hub namespace, ``tc tbf``
on both ends of each veth (the peer's uplink and its downlink), and latency as an NFQUEUE helper
(``nfqdelay.c`` here, compiled into the work dir) holding every packet that enters a peer namespace for
``delay_ms`` (the kernel has no netem). Every namespace is named ``swlwan<PID>-...`` and all the state lives
inside them, so killing what runs in them and deleting them removes all of it; ``remove_stale`` deletes
those of a run that was killed. Also here: the link check (raw TCP, ``socktest.py``), a thread sampling the
veths' byte counters from inside the hub namespace, and the CPU accounting that tells whether something else
ran on the machine during an arm. Needs root.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

WAN_DIR = Path(__file__).resolve().parent  # nfqdelay.c, socktest.py
NS_PREFIX = "swlwan"
SUBNET = "10.77.0"

# link settings: rate each way (tbf on both veth ends) and delay added on each peer's ingress (RTT = 2x)
LINKS = {
    "100mbit": {"rate": "100mbit", "delay_ms": 25.0, "check_mib": 24},
    "20mbit": {"rate": "20mbit", "delay_ms": 0.0, "check_mib": 6},
    "lan": {"rate": "1gbit", "delay_ms": 0.0, "check_mib": 64},  # (quality at a short, explicit overlap)
}
TBF = ["burst", "256kb", "latency", "50ms"]

APT_PACKAGES = ["iproute2", "iptables", "libnetfilter-queue-dev", "gcc"]


def log(msg: str) -> None:
    print(f"bench_wan: {msg}", flush=True)


def run(cmd: list[str], timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {done.returncode}: {(done.stderr or done.stdout).strip()[-400:]}")
    return done


# ------------------------------------------------------------------------------------------------ setup

def ensure_tools() -> None:
    """iproute2, iptables, gcc and libnetfilter_queue's headers: installed with apt-get when missing."""
    missing = [t for t in ("ip", "tc", "iptables", "gcc") if shutil.which(t) is None]
    if not Path("/usr/include/libnetfilter_queue/libnetfilter_queue.h").exists():
        missing.append("libnetfilter_queue.h")
    if not missing:
        return
    log(f"missing {', '.join(missing)}: apt-get install -y {' '.join(APT_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get install failed: {done.stderr.strip()[-400:]}")


def build_helper(workdir: Path) -> Path:
    out = workdir / "nfqdelay"
    run(["gcc", "-O2", "-o", str(out), str(WAN_DIR / "nfqdelay.c"), "-lnetfilter_queue", "-lnfnetlink"], timeout=120)
    return out


def netns_list() -> list[str]:
    done = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def ns_pids(ns: str) -> list[int]:
    done = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def kill_ns_processes(ns: str, grace: float = 2.0, keep: tuple[int, ...] = ()) -> None:
    """SIGTERM, then SIGKILL, whatever still runs inside namespace ``ns`` (only processes in our namespaces),
    except the pids in ``keep`` (the link's delay helpers)."""
    pids = [p for p in ns_pids(ns) if p not in keep]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.05)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def delete_namespaces(names: list[str]) -> list[str]:
    """Kill what runs in each namespace, delete it; returns the names that could not be deleted."""
    failed = []
    for ns in names:
        kill_ns_processes(ns)
        if run(["ip", "netns", "del", ns], check=False).returncode != 0 and ns in netns_list():
            failed.append(ns)
    return failed


def remove_stale() -> None:
    """Namespaces of earlier runs (``swlwan<PID>-...`` whose PID is no longer a running bench_wan)."""
    stale = []
    for ns in netns_list():
        if not ns.startswith(NS_PREFIX):
            continue
        owner = ns[len(NS_PREFIX):].split("-", 1)[0]
        alive = False
        if owner.isdigit() and int(owner) != os.getpid():
            try:
                alive = b"bench_wan" in Path(f"/proc/{owner}/cmdline").read_bytes()
            except OSError:
                alive = False
        if not alive:  # (a live bench_wan's namespaces are its own business)
            stale.append(ns)
    if stale:
        log(f"removing leftovers of an earlier run: {' '.join(stale)}")
        failed = delete_namespaces(stale)
        if failed:
            raise RuntimeError(f"could not delete stale namespaces {failed}")


class Wan:
    """The topology for one link setting: hub namespace with bridge br0, one namespace per peer."""

    def __init__(self, tag: str, peers: int, link: str, helper: Path, workdir: Path):
        self.tag, self.n, self.link, self.helper, self.workdir = tag, peers, link, helper, workdir
        self.spec = LINKS[link]
        self.hub = f"{tag}-hub"
        self.peer_ns = [f"{tag}-p{i}" for i in range(peers)]
        self.helpers: list[subprocess.Popen] = []
        self.created: list[str] = []

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.peer_ns[i]]

    def up(self) -> None:
        rate, delay = self.spec["rate"], self.spec["delay_ms"]
        for ns in [self.hub, *self.peer_ns]:
            run(["ip", "netns", "add", ns])
            self.created.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.peer_ns):
            # both ends created directly inside their namespaces: nothing ever appears in the root namespace
            run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"hv{i}", "netns", self.hub])
            run(["ip", "-n", self.hub, "link", "set", f"hv{i}", "master", "br0"])
            run(["ip", "-n", self.hub, "link", "set", f"hv{i}", "up"])
            run(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, *TBF])
            run(["ip", "netns", "exec", self.hub, "tc", "qdisc", "add", "dev", f"hv{i}", "root", "tbf", "rate", rate,
                 *TBF])
            if delay > 0:
                logf = open(self.workdir / f"nfqdelay-{self.link}-p{i}.log", "w")
                proc = subprocess.Popen([*self.exec_prefix(i), str(self.helper), "0", str(delay)], stdout=logf,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                logf.close()
                self.helpers.append(proc)
                deadline = time.monotonic() + 5
                while "nfqdelay q=" not in (self.workdir / f"nfqdelay-{self.link}-p{i}.log").read_text():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"nfqdelay in {ns} did not start: "
                                           f"{(self.workdir / f'nfqdelay-{self.link}-p{i}.log').read_text()[-300:]}")
                    time.sleep(0.05)
                run(["ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-i", "eth0", "-j", "NFQUEUE",
                     "--queue-num", "0"])

    def helpers_alive(self) -> bool:
        return all(p.poll() is None for p in self.helpers)

    def down(self) -> list[str]:
        for p in self.helpers:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.helpers = []
        failed = delete_namespaces([ns for ns in self.created if ns in netns_list()])
        self.created = []
        return failed


# ----------------------------------------------------------------------------------------- measurements

def link_check(wan: Wan, python: str) -> dict:
    """Raw TCP from peer 1's namespace to peer 0's: 20 one-byte ping-pongs (RTT), then MiB of data."""
    port = 45000 + os.getpid() % 1000
    script = str(WAN_DIR / "socktest.py")
    server = subprocess.Popen([*wan.exec_prefix(0), python, script, "server", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        server.stdout.readline()  # "listening"
        client = run([*wan.exec_prefix(1), python, script, "client", wan.addr(0), str(port),
                      str(wan.spec["check_mib"])], timeout=120)
        result = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(5)
    result.update(rate=wan.spec["rate"], delay_ms_each_ingress=wan.spec["delay_ms"], helpers_alive=wan.helpers_alive())
    return result


CLONE_NEWNET = 0x40000000


class Sampler(threading.Thread):
    """Every 0.1 s, the byte counters of the hub side of each peer's veth (``hvI``: tx = what peer I
    downloads, rx = what it uploads), read from inside the hub namespace (this thread alone enters it
    with setns and goes back to the original namespace before it ends)."""

    def __init__(self, hub: str, peers: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.hub, self.peers, self.period = hub, peers, period
        self.samples: list[tuple[float, list[int], list[int]]] = []  # (monotonic, rx per peer, tx per peer)
        self.halt = threading.Event()
        self.error: str | None = None
        self.ready = threading.Event()

    def run(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{self.hub}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                self.error = f"setns: {os.strerror(ctypes.get_errno())}"
                return
            try:
                names = [f"hv{i}" for i in range(self.peers)]
                while not self.halt.is_set():
                    t = time.monotonic()
                    stats = {}
                    with open("/proc/thread-self/net/dev") as f:
                        for line in f.readlines()[2:]:
                            name, rest = line.split(":", 1)
                            fields = rest.split()
                            stats[name.strip()] = (int(fields[0]), int(fields[8]))
                    if all(n in stats for n in names):
                        self.samples.append((t, [stats[n][0] for n in names], [stats[n][1] for n in names]))
                        self.ready.set()
                    else:
                        self.error = f"no {names} in the hub namespace's counters"
                    self.halt.wait(max(0.0, self.period - (time.monotonic() - t)))
            finally:
                libc.setns(home, CLONE_NEWNET)
        except Exception as e:  # noqa: BLE001 - reported in the results
            self.error = f"{type(e).__name__}: {e}"
        finally:
            os.close(target)
            os.close(home)
            self.ready.set()

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


def wire_stats(samples: list[tuple[float, list[int], list[int]]], t0: float, t1: float, peers: int,
               window: float = 1.0) -> dict:
    """Peak bytes/s over ``window``-second windows per peer (up+down, up, down), and totals, in [t0, t1]."""
    s = [x for x in samples if t0 <= x[0] <= t1]
    if len(s) < 2 or s[-1][0] - s[0][0] < window:
        return {"samples": len(s)}
    peaks, ups, downs, totals = [], [], [], []
    for p in range(peers):
        best = best_up = best_down = 0.0
        j = 0
        for i in range(len(s)):
            while j < len(s) and s[j][0] - s[i][0] < window:
                j += 1
            if j >= len(s):
                break
            dt = s[j][0] - s[i][0]
            up = (s[j][1][p] - s[i][1][p]) / dt      # rx on the hub side: what the peer sent
            down = (s[j][2][p] - s[i][2][p]) / dt    # tx on the hub side: what the peer received
            best, best_up, best_down = max(best, up + down), max(best_up, up), max(best_down, down)
        peaks.append(best)
        ups.append(best_up)
        downs.append(best_down)
        totals.append((s[-1][1][p] - s[0][1][p]) + (s[-1][2][p] - s[0][2][p]))
    span = s[-1][0] - s[0][0]
    return {
        "peak_Bps_max": max(peaks), "peak_Bps_mean": statistics.fmean(peaks), "peak_Bps_per_peer": peaks,
        "peak_up_Bps_max": max(ups), "peak_down_Bps_max": max(downs),
        "mean_Bps_per_peer": statistics.fmean(totals) / span, "wire_bytes_per_peer": statistics.fmean(totals),
        "span_s": span, "samples": len(s),
    }


class CpuTracker:
    """CPU seconds of this benchmark's processes (the peers' sessions: each peer and all its helpers, p2pd
    included; the delay helpers; this process) against the machine's, to tell whether something else ran
    during an arm (its timings are then not clean). Processes are sampled every ``period`` s from /proc; a
    process's last partial period before it exits is missed."""

    def __init__(self, sids: set[int], period: float = 0.5):
        self.sids, self.period = sids, period
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.t_sample = 0.0
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0, self.stat0, self.self0 = time.monotonic(), self._stat(), self._self()
        self.load0 = os.getloadavg()
        self.sample(force=True, initial=True)

    @staticmethod
    def _self() -> float:
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def _stat(self) -> list[float]:
        with open("/proc/stat") as f:
            return [int(x) / self.hz for x in f.readline().split()[1:]]

    def sample(self, force: bool = False, initial: bool = False) -> None:
        if not force and time.monotonic() - self.t_sample < self.period:
            return
        self.t_sample = time.monotonic()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(rest[3]) not in self.sids:
                continue
            pid, cpu = int(entry), (int(rest[11]) + int(rest[12])) / self.hz
            if initial:  # running before the arm (the delay helpers): only what they use from now on counts
                self.base[pid] = cpu
            self.last[pid] = max(cpu, self.last.get(pid, 0.0))

    def result(self) -> dict:
        self.sample(force=True)
        span = time.monotonic() - self.t0
        st = self._stat()
        d = [b - a for a, b in zip(self.stat0, st)]  # user nice system idle iowait irq softirq steal ...
        tasks = d[0] + d[1] + d[2]
        ours = sum(v - self.base.get(pid, 0.0) for pid, v in self.last.items()) + self._self() - self.self0
        return {"span_s": span, "cpus": os.cpu_count(), "machine_task_cores": tasks / span,
                "bench_cores": ours / span, "other_cores": max(0.0, tasks - ours) / span,
                "softirq_cores": d[6] / span if len(d) > 6 else None, "steal_cores": d[7] / span if len(d) > 7 else None,
                "loadavg_start": self.load0, "loadavg_end": os.getloadavg()}
