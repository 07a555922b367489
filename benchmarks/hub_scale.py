"""The hub at scale: N simulated devices against a real ``fedvlm-hub start`` and mosquitto.

Per setting (devices x update size x hub workers) one run:

1. starts a fresh mosquitto on a free loopback port with its own config (no connection
   limit, QoS 1 queues deep enough that the broker never drops a message for the hub);
2. registers N clients in a fresh hub state directory (their secrets go to the devices);
3. connects N devices from this process, each on its own MQTT connection
   (``device_swarm.Swarm``), and waits until every one has announced itself online;
4. measures what mosquitto alone needs to carry the same bytes: every device builds,
   signs and chunks its update exactly as in a round and publishes the chunks (QoS 1) to
   a subscriber process that only counts them (the "carry" time: first publish to last
   delivery). Same generator, same work on its side; only the receiver differs;
5. starts ``fedvlm-hub start --rounds 1`` (and ``fedvlm-hub worker`` processes when the
   setting has workers) and times: round open (hub started -> round collecting, seen by
   an observer connection), round (open -> global version 1's manifest published);
6. checks that the round counted every update exactly once: each device got its
   ``accepted`` ack, the hub's database holds N receipts, and the published global
   equals the sample-weighted mean of the N updates (max relative error);
7. records peak RSS of the hub, the workers and mosquitto (the kernel's VmHWM of each,
   read every 50 ms) and the update throughput (MB/s over the round);
8. records CPU seconds (user + system, from ``/proc/PID/stat``) of the hub, each worker,
   mosquitto and this process (the load generator) over the round (open -> published) and
   over the carry run, and the hub's and workers' over their whole life, and reports them
   per update (ms): unlike the times, a figure that does not depend on who else ran on
   the machine's cores meanwhile.

A ``:drain`` setting (workers only, e.g. ``10000x64KiB:2w:drain``) times the workers
without the generator's signing and sending on the same cores: the workers are stopped
(SIGSTOP) as soon as they hold their shared subscription, every device sends its update
(the broker keeps each worker's share in its session), and the workers are let go
(SIGCONT) once the broker has every update. The "drain" is the time from then to the last
update judged (the latest receipt's time in the hub's database); the time to the last
device's ``accepted`` ack is reported beside it (it adds the acks' way back through the
broker to the generator, which still reads them during the drain: its CPU is in the
drain's figures). In a normal round the generator signs and sends while the workers
judge, and on a machine with fewer cores than processes the round measures who wins the
cores, not how fast the workers take a round. The stop must fit the workers' MQTT
keepalive (30 s; the broker drops a connection silent for 45 s): a longer one is an error.

    python benchmarks/hub_scale.py --out work/bench/hub-scale                # every setting
    python benchmarks/hub_scale.py --settings 1000x64KiB,1000x64KiB:2w --out DIR
    make bench-hub-scale

Writes ``hub_scale.json`` and ``hub_scale.md`` under ``--out`` (plus each setting's
logs). The open-files limit is raised to the hard limit (10,000 devices need 10,000
sockets here and in mosquitto); if the hard limit is too low, raise it (``ulimit -Hn``
as root, or ``LimitNOFILE`` in a systemd unit) before running.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # run as a script: tests/ and the swarm are siblings
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from device_swarm import Swarm, UpdateRecipe, raise_open_files_limit  # noqa: E402
from fedvlm.hub.clients import register_clients  # noqa: E402
from fedvlm.hub.store import HubStore  # noqa: E402
from fedvlm.hub.worker_readiness import unsubscribed_workers  # noqa: E402
from fedvlm.shared import tensor_codec  # noqa: E402
from fedvlm.shared.mqtt_link import BrokerAddress, MqttLink  # noqa: E402
from fedvlm.shared.protocol import GlobalManifest, HubState, RoundPhase, Topics  # noqa: E402
from tests.brokers import LOOPBACK, MosquittoProcess  # noqa: E402

FEDERATION = "scale"
DEFAULT_SETTINGS = ("100x64KiB,1000x64KiB,10000x64KiB,1000x1MiB,1000x64KiB:1w,1000x64KiB:2w,10000x64KiB:1w,"
                    "10000x64KiB:2w,10000x64KiB:1w:drain,10000x64KiB:2w:drain")
_SIZE = re.compile(r"(\d+)(B|KiB|MiB)")
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 * 1024}
_CARRY_PREFIX = "bench/carry"


# ====================================================================== settings
@dataclasses.dataclass(frozen=True)
class Setting:
    devices: int
    update_bytes: int
    workers: int = 0  # 0: the hub takes the updates itself
    drain: bool = False  # workers stopped until the broker holds every update (see the module's doc)

    @property
    def label(self) -> str:
        size = (f"{self.update_bytes // _UNITS['MiB']}MiB" if self.update_bytes % _UNITS["MiB"] == 0
                else f"{self.update_bytes // 1024}KiB" if self.update_bytes % 1024 == 0 else f"{self.update_bytes}B")
        workers = f":{self.workers}w" if self.workers else ""
        return f"{self.devices}x{size}{workers}" + (":drain" if self.drain else "")

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``DEVICESxSIZE[:Kw][:drain]``: ``10000x64KiB``, ``1000x64KiB:2w``, ``1000x64KiB:2w:drain``."""
        match = re.fullmatch(r"(\d+)x(\d+(?:B|KiB|MiB))(?::(\d+)w)?(:drain)?", text.strip())
        if match is None:
            raise argparse.ArgumentTypeError(f"setting {text!r}: write DEVICESxSIZE[:Kw][:drain], e.g. "
                                             "1000x64KiB, 1000x1MiB:2w or 1000x64KiB:2w:drain (sizes in B, KiB or "
                                             "MiB)")  # fmt: skip
        size = _SIZE.fullmatch(match.group(2))
        assert size is not None
        devices, workers = int(match.group(1)), int(match.group(3) or 0)
        if devices < 1:
            raise argparse.ArgumentTypeError(f"setting {text!r}: at least one device")
        drain = match.group(4) is not None
        if drain and not workers:
            raise argparse.ArgumentTypeError(f"setting {text!r}: a drain stops the hub workers, so it needs some "
                                             f"(e.g. {devices}x{match.group(2)}:1w:drain)")  # fmt: skip
        return cls(devices, int(size.group(1)) * _UNITS[size.group(2)], workers, drain)


def parse_settings(text: str) -> list[Setting]:
    return [Setting.parse(part) for part in text.split(",") if part.strip()]


# ====================================================================== processes
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str = "self", *, children: bool = True) -> float | None:
    """User + system CPU seconds of process ``pid`` (every thread; with ``children``, plus
    the children it has reaped) from ``/proc/PID/stat``; None when it is not there. A
    zombie (exited, not yet reaped) still shows its final times."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces): state is field 3, utime 14.
    fields = text[text.rindex(")") + 2:].split()
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return (utime + stime + (cutime + cstime if children else 0)) / _CLOCK_TICKS


class CpuMeter:
    """CPU seconds of named processes, read together (``snapshot``), and the difference of two reads."""

    def __init__(self) -> None:
        self.pids: dict[str, int | str] = {}

    def add(self, name: str, pid: int | str) -> None:
        self.pids[name] = pid

    def snapshot(self) -> dict[str, float]:
        # Without reaped children: this process reaps the hubs, brokers and subscribers it ran.
        readings = {name: cpu_seconds(pid, children=False) for name, pid in list(self.pids.items())}
        return {name: value for name, value in readings.items() if value is not None}

    @staticmethod
    def spent(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
        """CPU seconds each process spent between two snapshots (those in both)."""
        if not before or not after:
            return {}
        return {name: round(after[name] - before[name], 3) for name in after if name in before}


class MeasuredProcess:
    """A child process, its peak RSS (the kernel's VmHWM, read every 50 ms until it exits)
    and its CPU seconds (``cpu_s``: user + system of its whole life, read from its
    ``/proc`` entry once it has exited and before it is reaped).

    Not ``wait4``'s ``ru_maxrss``: a child forked from this (large) process carries its
    parent's RSS until ``exec``, and ``ru_maxrss`` counts that.
    """

    def __init__(self, process: subprocess.Popen, log_path: Path | None = None) -> None:
        self.process = process
        self.log_path = log_path
        self.peak_rss_mib: float | None = None
        self.cpu_s: float | None = None
        # Held while the process is looked at through its pid, so it is not reaped (and the
        # pid reused) in between.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    @classmethod
    def spawn(cls, command: list[str], log_path: Path) -> MeasuredProcess:
        with log_path.open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return cls(process, log_path)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def _read_hwm(self) -> None:
        try:
            text = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_mib = max(self.peak_rss_mib or 0.0, int(line.split()[1]) / 1024)

    def signal(self, signum: int) -> bool:
        """Send ``signum`` unless the process has exited (then False), without reaping it:
        ``Popen.send_signal`` would, and its final CPU and peak RSS would go unread."""
        with self._lock:
            if self.exited():
                return False
            os.kill(self.process.pid, signum)
            return True

    def exited(self) -> bool:
        """True once the process has exited, without reaping it (its /proc entry stays)."""
        if self.process.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
        except ChildProcessError:  # reaped by someone else
            return True

    def _read(self) -> bool:
        """Read peak RSS and CPU while the pid is still this process's; True once it has exited."""
        with self._lock:
            if self.process.returncode is not None:
                return True
            exited = self.exited()
            self._read_hwm()
            cpu = cpu_seconds(self.process.pid)
            if cpu is not None:
                self.cpu_s = cpu
            return exited

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            if self._read():
                return

    def reap(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the process to exit; True once it has (and is reaped)."""
        deadline = time.monotonic() + timeout
        while not self._read():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        with self._lock:  # its final CPU times are read: now it may go
            self.process.wait()
        self._stop.set()
        return True

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, SIGKILL if it does not exit in ``timeout``."""
        if not self._read():
            self.process.send_signal(signal.SIGTERM)
        if not self.reap(timeout):  # also reaps one that had exited already
            self.process.kill()
            self.reap(10)
        self._stop.set()
        return self.process.returncode


class BenchMosquitto(MosquittoProcess):
    """mosquitto configured for load: no connection cap, deep QoS 1 queues."""

    def _write_config(self) -> None:
        self.config_path.write_text(
            f"listener {self.port} {LOOPBACK}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_connections -1\n"
            # Messages queued for a subscriber that lags (the hub while a round arrives)
            # beyond this are dropped by mosquitto: keep them all (the defaults drop at 1,000).
            "max_queued_messages 10000000\n"
            "max_queued_bytes 0\n"
            "set_tcp_nodelay true\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )


class Observer:
    """One extra connection that notes when round 1 opens and when version 1 is published,
    and the CPU seconds of ``meter``'s processes at both moments."""

    def __init__(self, address: BrokerAddress, topics: Topics, meter: CpuMeter | None = None) -> None:
        self.opened_at: float | None = None
        self.published_at: float | None = None
        self.meter = meter if meter is not None else CpuMeter()
        self.opened_cpu: dict[str, float] | None = None
        self.published_cpu: dict[str, float] | None = None
        # Called (on the observer's thread) when the round opens and when it is published.
        self.on_opened: list[Callable[[], None]] = []
        self.on_published: list[Callable[[], None]] = []
        self.opened = threading.Event()
        self.published = threading.Event()
        self.link = MqttLink(address, "bench-observer", protocol="5", persistent_session=False).connect(15)
        self.link.subscribe(topics.hub_state(), self._on_state)
        self.link.subscribe(topics.global_manifest(), self._on_manifest)

    def _on_state(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload and not self.opened.is_set():
            state = HubState.from_json(payload)
            if state.round == 1 and state.phase is RoundPhase.COLLECTING:
                self.opened_at = time.monotonic()
                self.opened_cpu = self.meter.snapshot()
                for callback in self.on_opened:
                    callback()
                self.opened.set()

    def _on_manifest(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload and not self.published.is_set() and GlobalManifest.from_json(payload).version >= 1:
            self.published_at = time.monotonic()
            self.published_cpu = self.meter.snapshot()
            for callback in self.on_published:
                callback()
            self.published.set()

    def close(self) -> None:
        self.link.close()


class WorkerPause:
    """A drain's first half: stops (SIGSTOP) the workers as soon as each holds its shared
    subscription for the coordinator's run (the record the coordinator waits for before it
    opens a round), so every update of the round waits for them in the broker."""

    def __init__(self, state_dir: Path, workers: list[MeasuredProcess], timeout: float) -> None:
        self.state_dir, self.workers, self.timeout = state_dir, workers, timeout
        self.stopped = threading.Event()
        self.stopped_at: float | None = None
        self.error: str | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._stop_when_subscribed, daemon=True)
        self._thread.start()

    def _stop_when_subscribed(self) -> None:
        deadline = time.monotonic() + self.timeout
        waiting = set(range(len(self.workers)))
        try:
            # The database exists (the clients were registered in it before the hub started).
            # Polled every 5 ms: the coordinator checks at most every 0.5 s, then still has to
            # open the round and the devices to sign and send, so the workers stop first
            # (``acked_before_drain`` in the result would tell otherwise).
            with HubStore.in_state_dir(self.state_dir, create=False) as store:
                while waiting and time.monotonic() < deadline and not self._cancelled.is_set():
                    for index in sorted(waiting - set(unsubscribed_workers(store, len(self.workers)))):
                        if not self.workers[index].signal(signal.SIGSTOP):
                            raise RuntimeError(f"worker {index} exited with status "
                                               f"{self.workers[index].returncode} before the drain")  # fmt: skip
                        waiting.discard(index)
                    time.sleep(0.005)
            if waiting and not self._cancelled.is_set():
                self.error = f"worker(s) {sorted(waiting)} did not subscribe within {self.timeout:.0f} s"
        except Exception as error:  # told by ``_drain``, which waits for this thread
            self.error = f"stopping the workers: {type(error).__name__}: {error}"
        self.stopped_at = time.monotonic()
        self.stopped.set()

    def all_alive(self) -> bool:
        return not any(worker.exited() for worker in self.workers)

    def resume(self) -> None:
        """Let every worker go (again); also ends a pause still waiting for its workers."""
        self._cancelled.set()
        self._thread.join()
        for worker in self.workers:
            worker.signal(signal.SIGCONT)


# Past the workers' MQTT keepalive (30 s) the broker drops a stopped worker's connection at
# 45 s; it comes back to its session, but the drain would then time a reconnection too.
_LONGEST_PAUSE_S = 40.0


def _drain(swarm: Swarm, pause: WorkerPause, meter: CpuMeter, devices: int, state_dir: Path,
           timeout: float) -> dict[str, Any]:  # fmt: skip
    """A drain's second half: once the broker holds every update, let the workers go and time
    them to the last update judged (its receipt's time) and to the last device's
    ``accepted`` ack; CPU seconds of every process in between."""
    if not pause.stopped.wait(timeout) or pause.error:
        raise RuntimeError(f"drain: {pause.error or 'the workers were not stopped'}")
    if not swarm.wait(lambda c: c.uploads_delivered >= devices or not pause.all_alive(), timeout):
        raise TimeoutError(f"drain: the broker took only {swarm.counts.uploads_delivered} of {devices} updates "
                           f"within {timeout:.0f} s")  # fmt: skip
    if not pause.all_alive():
        raise RuntimeError("drain: a worker exited while it was stopped; see its log")
    assert pause.stopped_at is not None
    paused_s = time.monotonic() - pause.stopped_at
    if paused_s > _LONGEST_PAUSE_S:
        raise RuntimeError(f"drain: the workers were stopped {paused_s:.0f} s, past their MQTT keepalive; run fewer "
                           "devices or smaller updates in a drain")  # fmt: skip
    acked_before = swarm.counts.accepted_acks
    before = meter.snapshot()
    started, started_wall = time.monotonic(), time.time()
    pause.resume()
    if not swarm.wait(lambda c: c.devices_accepted >= devices or not pause.all_alive(), timeout):
        raise TimeoutError(f"drain: {swarm.counts.devices_accepted} of {devices} accepted {timeout:.0f} s after "
                           f"the workers were let go")  # fmt: skip
    if not pause.all_alive():
        raise RuntimeError("drain: a worker exited during the drain; see its log")
    last_ack = swarm.counts.last_accepted_at
    spent = CpuMeter.spent(before, meter.snapshot())
    with HubStore.in_state_dir(state_dir, create=False) as store:
        last_judged = max(receipt.accepted_at for receipt in store.receipts(1))
    return {"drain_s": last_judged - started_wall, "drain_to_last_ack_s": (last_ack or time.monotonic()) - started,
            "drain_cpu_s": spent, "acked_before_drain": acked_before, "workers_paused_s": paused_s}  # fmt: skip


# ====================================================================== one setting
@dataclasses.dataclass
class SettingResult:
    setting: str
    devices: int
    update_bytes: int
    workers: int
    drain: bool = False
    signed_update_bytes: int = 0
    connect_s: float = 0.0
    carry_s: float | None = None
    round_open_s: float | None = None
    round_s: float | None = None
    accepted_devices: int = 0
    accepted_acks: int = 0
    receipts: int | None = None
    global_max_rel_error: float | None = None
    exactly_once: bool = False
    rejections: dict[str, int] = dataclasses.field(default_factory=dict)
    resends: int = 0
    hub_peak_rss_mib: float | None = None
    worker_peak_rss_mib: list[float] = dataclasses.field(default_factory=list)
    broker_peak_rss_mib: float | None = None
    mb_per_s: float | None = None
    round_over_carry: float | None = None
    # CPU seconds (user + system) over the round (open -> published) of "hub", "worker-K",
    # "mosquitto" and "generator" (this process: the devices, the observer, the samplers),
    # over the carry run of "mosquitto", "generator" and "subscriber", and over the whole
    # life of the hub and of each worker (start-up, round open, shutdown included).
    round_cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)
    carry_cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)
    hub_cpu_s: float | None = None
    worker_cpu_s: list[float] = dataclasses.field(default_factory=list)
    hub_exit_status: int | None = None
    # A drain setting's: workers let go -> the last update judged (its receipt's time) and
    # -> the last device's accepted ack, the CPU seconds of every process in between, updates
    # acknowledged before the workers were let go (0 unless the stop came late) and how long
    # the workers were stopped.
    drain_s: float | None = None
    drain_to_last_ack_s: float | None = None
    drain_cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)
    acked_before_drain: int | None = None
    workers_paused_s: float | None = None
    error: str | None = None

    def cpu_ms_per_update(self, spent: dict[str, float], *names: str) -> float | None:
        """CPU milliseconds per device's update of the processes ``names`` (a prefix such as
        "worker-" takes every worker) together; None when none of them was measured."""
        values = [value for name, value in spent.items() if any(name.startswith(prefix) for prefix in names)]
        return 1000 * sum(values) / self.devices if values else None


def hub_command(setting: Setting, broker_url: str, state_dir: Path) -> list[str]:
    return [sys.executable, "-m", "fedvlm.hub.cli", "start", "--federation", FEDERATION, "--state-dir", str(state_dir),
            "--broker", broker_url, "--mqtt-protocol", "5", "--rounds", "1", "--min-clients", str(setting.devices),
            "--quorum", str(setting.devices), "--round-timeout", "3600", "--quiet",
            "--max-update-bytes", str(2 * setting.update_bytes + 1024 * 1024),
            "--workers", str(setting.workers)]  # fmt: skip


def worker_command(setting: Setting, broker_url: str, state_dir: Path, index: int) -> list[str]:
    return [sys.executable, "-m", "fedvlm.hub.cli", "worker", "--federation", FEDERATION, "--state-dir",
            str(state_dir), "--broker", broker_url, "--index", str(index), "--workers", str(setting.workers),
            "--quiet"]  # fmt: skip


def _carry_time(swarm: Swarm, broker: BenchMosquitto, work: Path, timeout: float,
                meter: CpuMeter) -> tuple[float, dict[str, float]]:  # fmt: skip
    """Seconds mosquitto needs to carry every device's signed update (the same chunks a round
    sends, built by the same swarm) to one subscriber that only counts them, and the CPU
    seconds ``meter``'s processes and the subscriber spent meanwhile."""
    _, chunks = swarm.upload_shape()
    subscriber = subprocess.Popen([sys.executable, __file__, "--carry-subscriber", str(broker.port),
                                   str(len(swarm.devices) * chunks)], stdout=subprocess.PIPE,
                                  stderr=(work / "carry.log").open("wb"), stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert subscriber.stdout is not None
        if subscriber.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the carry subscriber did not start; see {work / 'carry.log'}")
        meter.add("subscriber", subscriber.pid)
        try:
            before = meter.snapshot()
            started = time.monotonic()
            swarm.carry(_CARRY_PREFIX)
            line = _readline(subscriber, timeout)
            return json.loads(line)["last"] - started, CpuMeter.spent(before, meter.snapshot())
        finally:
            del meter.pids["subscriber"]
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
        subscriber.wait()


def _readline(process: subprocess.Popen, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or not result[0].strip():
        raise TimeoutError(f"the carry subscriber got not every message within {timeout:.0f} s")
    return result[0]


class RoundProfiler:
    """``py-spy record`` of processes from the round's opening to its global's publication
    (diagnostics: where a process's CPU goes in the round, not in start-up or round open)."""

    def __init__(self, py_spy: str, out: Path, rate: int = 200) -> None:
        self.py_spy, self.out, self.rate = py_spy, out, rate
        self.targets: dict[str, int] = {}
        self._recorders: list[subprocess.Popen] = []

    def start(self) -> None:
        for name, pid in self.targets.items():
            self._recorders.append(subprocess.Popen(
                [self.py_spy, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw", "--threads",
                 "--nonblocking", "--output", str(self.out / f"py-spy-{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=(self.out / f"py-spy-{name}.log").open("wb")))  # fmt: skip

    def stop(self) -> None:
        for recorder in self._recorders:  # SIGINT: py-spy writes what it recorded and exits
            recorder.send_signal(signal.SIGINT)
        for recorder in self._recorders:
            try:
                recorder.wait(30)
            except subprocess.TimeoutExpired:
                recorder.kill()
        self._recorders.clear()


def run_setting(setting: Setting, out: Path, *, timeout: float = 900.0, window: int = 256,
                show_progress: bool = True, py_spy: str | None = None) -> SettingResult:  # fmt: skip
    """Run one setting end to end; every process it starts is stopped before it returns.
    ``py_spy``: the path of py-spy, to profile the hub, the workers and this process over
    the round (``py-spy-NAME.txt`` in the setting's folder, collapsed stacks)."""
    result = SettingResult(setting.label, setting.devices, setting.update_bytes, setting.workers, setting.drain)
    work = out / setting.label.replace(":", "-")
    work.mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="hub-", dir=work))
    recipe = UpdateRecipe(setting.update_bytes)
    ids = [f"d{index:06d}" for index in range(setting.devices)]
    secrets = register_clients(state_dir, ids)
    broker = BenchMosquitto(work / "mosquitto").start()
    broker_process = MeasuredProcess(broker.process)
    meter = CpuMeter()
    meter.add("mosquitto", broker.process.pid)
    meter.add("generator", "self")
    topics = Topics(FEDERATION)
    swarm = observer = hub = pause = None
    workers: list[MeasuredProcess] = []
    try:
        # Before the devices: paho's own network thread uses select(), which fails on file
        # descriptors above 1024, and the devices' sockets take the low numbers first.
        observer = Observer(broker.broker.address, topics, meter)
        swarm = Swarm(LOOPBACK, broker.port, FEDERATION, [(i, secrets[i]) for i in ids], recipe, window=window)
        started = time.monotonic()
        swarm.connect_all()
        if not swarm.wait(lambda c: c.announced >= setting.devices, timeout):
            raise TimeoutError(f"only {swarm.counts.announced} of {setting.devices} devices connected and announced")
        result.connect_s = time.monotonic() - started
        result.signed_update_bytes = swarm.upload_shape()[0]
        result.carry_s, result.carry_cpu_s = _carry_time(swarm, broker, work, timeout, meter)
        spawned = time.monotonic()
        hub = MeasuredProcess.spawn(hub_command(setting, broker.broker.url, state_dir), work / "hub.log")
        workers = [MeasuredProcess.spawn(worker_command(setting, broker.broker.url, state_dir, index),
                                   work / f"worker-{index}.log") for index in range(setting.workers)]  # fmt: skip
        if setting.drain:
            pause = WorkerPause(state_dir, workers, timeout)
        meter.add("hub", hub.process.pid)
        for index, worker in enumerate(workers):
            meter.add(f"worker-{index}", worker.process.pid)
        if py_spy is not None:
            profiler = RoundProfiler(py_spy, work)
            profiler.targets = {name: pid for name, pid in meter.pids.items() if isinstance(pid, int)
                                and name != "mosquitto"} | {"generator": os.getpid()}  # fmt: skip
            observer.on_opened.append(profiler.start)
            observer.on_published.append(profiler.stop)
        if not observer.opened.wait(timeout):
            raise TimeoutError(f"round 1 did not open within {timeout:.0f} s; see {hub.log_path}")
        assert observer.opened_at is not None
        result.round_open_s = observer.opened_at - spawned
        if pause is not None:
            for name, value in _drain(swarm, pause, meter, setting.devices, state_dir, timeout).items():
                setattr(result, name, value)
        bar = tqdm(total=setting.devices, desc=setting.label, unit="dev", disable=not show_progress, leave=False)

        def progress(counts: Any) -> None:
            bar.update(counts.devices_accepted - bar.n)

        swarm.wait(lambda c: observer.published.is_set() and c.devices_accepted >= setting.devices, timeout, progress)
        bar.close()
        if observer.published_at is not None:
            result.round_s = observer.published_at - observer.opened_at
            result.round_cpu_s = CpuMeter.spent(observer.opened_cpu, observer.published_cpu)
            result.mb_per_s = setting.devices * result.signed_update_bytes / result.round_s / 1e6
            if result.carry_s:
                result.round_over_carry = result.round_s / result.carry_s
        for index, worker in enumerate(workers):  # a worker that died made the figures the hub's alone
            if worker.exited():
                raise RuntimeError(f"worker {index} exited with status {worker.process.returncode} during the round; "
                                   f"see {worker.log_path}")  # fmt: skip
        if not hub.reap(120):
            hub.stop()
        result.hub_exit_status = hub.returncode
        result.hub_peak_rss_mib = hub.peak_rss_mib
    except Exception as error:  # reported in the table; the next setting still runs
        result.error = f"{type(error).__name__}: {error}"
    finally:
        if pause is not None:  # a stopped process would take a SIGTERM only once let go
            pause.resume()
        for process in (*workers, *([hub] if hub is not None else [])):
            process.stop()
        result.worker_peak_rss_mib = [w.peak_rss_mib for w in workers if w.peak_rss_mib is not None]
        result.worker_cpu_s = [w.cpu_s for w in workers if w.cpu_s is not None]
        if hub is not None:
            result.hub_cpu_s = hub.cpu_s
        if hub is not None and result.hub_peak_rss_mib is None:
            result.hub_peak_rss_mib = hub.peak_rss_mib
        if swarm is not None:
            result.accepted_devices = swarm.counts.devices_accepted
            result.accepted_acks = swarm.counts.accepted_acks
            result.rejections = dict(swarm.counts.rejections)
            result.resends = swarm.counts.resends
            accepted = swarm.accepted_indices()
            swarm.close()
        else:
            accepted = []
        if observer is not None:
            observer.close()
        broker_process.stop()
        broker.process = None
        result.broker_peak_rss_mib = broker_process.peak_rss_mib
    _check_exactly_once(result, state_dir, recipe, accepted)
    return result


def _check_exactly_once(result: SettingResult, state_dir: Path, recipe: UpdateRecipe, accepted: list[int]) -> None:
    """Receipts in the hub's database, and the published global against the exact weighted mean."""
    try:
        with HubStore.in_state_dir(state_dir, create=False) as store:
            result.receipts = len(store.receipts(1))
            latest = store.latest_global()
            if latest is None or not accepted:
                return
            tensors, _ = tensor_codec.decode(Path(latest.file_path).read_bytes())
    except Exception as error:
        result.error = result.error or f"reading the hub's state: {error}"
        return
    result.global_max_rel_error = max_relative_error(tensors, recipe.expected_mean(accepted))
    result.exactly_once = (result.accepted_devices == result.devices == result.receipts
                           and result.accepted_acks == result.devices and result.global_max_rel_error < 1e-6)


def max_relative_error(tensors: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    """The largest error of the published global against the exact mean, relative to each tensor's scale."""
    return max(float(np.max(np.abs(tensors[key].astype(np.float64) - value))) / max(float(np.max(np.abs(value))), 1e-30)
               for key, value in expected.items())  # fmt: skip


# ====================================================================== reports
def markdown_table(results: list[SettingResult]) -> str:
    lines = ["| setting | devices | update | workers | round open (s) | round (s) | accepted once | hub peak RSS (MiB) "
             "| worker peak RSS (MiB) | mosquitto peak RSS (MiB) | MB/s | mosquitto carry (s) | round / carry "
             "| round CPU ms/update: hub | workers | mosquitto | generator | all "
             "| carry CPU ms/update: mosquitto | generator | subscriber | all |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in results:
        accepted = f"{r.accepted_devices:,}/{r.devices:,}" + (" ✓" if r.exactly_once else " ✗")
        workers = ", ".join(f"{v:.0f}" for v in r.worker_peak_rss_mib) or "—"
        round_cpu = [r.cpu_ms_per_update(r.round_cpu_s, *names) for names in
                     (("hub",), ("worker-",), ("mosquitto",), ("generator",), ("",))]  # fmt: skip
        carry_cpu = [r.cpu_ms_per_update(r.carry_cpu_s, *names) for names in
                     (("mosquitto",), ("generator",), ("subscriber",), ("",))]  # fmt: skip
        lines.append(f"| {r.setting} | {r.devices:,} | {r.update_bytes // 1024:,} KiB | {r.workers or 'hub alone'} | "
                     f"{_number(r.round_open_s)} | {_number(r.round_s)} | {accepted} | "
                     f"{_number(r.hub_peak_rss_mib, 0)} | {workers} | {_number(r.broker_peak_rss_mib, 0)} | "
                     f"{_number(r.mb_per_s)} | {_number(r.carry_s, 2)} | {_number(r.round_over_carry)} | "
                     + " | ".join(_number(value, 2) for value in round_cpu + carry_cpu) + " |")  # fmt: skip
    errors = [f"- {r.setting}: {r.error}" for r in results if r.error]
    return "\n".join(lines + drain_table(results) + ([""] + errors if errors else []))


def drain_table(results: list[SettingResult]) -> list[str]:
    """The drain settings' own figures (none: no lines): the workers' intake with the load
    generator out of the way. Their "round" above includes the time the workers were stopped."""
    drains = [r for r in results if r.drain]
    if not drains:
        return []
    lines = ["", "Drains (workers stopped until the broker held every update, then timed to the last update "
             "judged):", "",
             "| setting | workers | workers stopped (s) | acked before the drain | drain (s) | updates/s | MB/s "
             "| to the last ack (s) | drain CPU ms/update: workers | mosquitto | generator | hub |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in drains:
        rate = r.devices / r.drain_s if r.drain_s else None
        mb_s = r.devices * r.signed_update_bytes / r.drain_s / 1e6 if r.drain_s else None
        cpu = [r.cpu_ms_per_update(r.drain_cpu_s, name) for name in ("worker-", "mosquitto", "generator", "hub")]
        lines.append(f"| {r.setting} | {r.workers} | {_number(r.workers_paused_s)} | "
                     f"{'—' if r.acked_before_drain is None else r.acked_before_drain} | {_number(r.drain_s, 2)} | "
                     f"{_number(rate, 0)} | {_number(mb_s)} | {_number(r.drain_to_last_ack_s, 2)} | "
                     + " | ".join(_number(value, 2) for value in cpu) + " |")  # fmt: skip
    return lines


def _number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def targets(results: list[SettingResult]) -> list[str]:
    """The issue's targets, each with the measured numbers and whether it holds."""
    by = {r.setting: r for r in results}
    lines = []

    def check(label: str, holds: bool, detail: str) -> None:
        lines.append(f"- {'holds' if holds else 'FAILS'}: {label} ({detail})")

    for name in ("10000x64KiB", "1000x1MiB"):
        if name in by:
            r = by[name]
            check(f"{name} every update accepted exactly once", r.exactly_once,
                  f"{r.accepted_devices}/{r.devices} acked, {r.receipts} receipts, global error "
                  f"{r.global_max_rel_error if r.global_max_rel_error is not None else '—'}")
    small, big = by.get("1000x64KiB"), by.get("10000x64KiB")
    if small and big and small.hub_peak_rss_mib and big.hub_peak_rss_mib:
        ratio = big.hub_peak_rss_mib / small.hub_peak_rss_mib
        check("hub peak RSS at 10,000 within 10 % of 1,000", ratio <= 1.10,
              f"{big.hub_peak_rss_mib:.0f} vs {small.hub_peak_rss_mib:.0f} MiB, x{ratio:.2f}")
    if small and big and small.round_open_s and big.round_open_s and small.round_s and big.round_s:
        open_ratio, round_ratio = big.round_open_s / small.round_open_s, big.round_s / small.round_s
        check("round open and round at 10,000 within 12x of 1,000", open_ratio <= 12 and round_ratio <= 12,
              f"open x{open_ratio:.1f}, round x{round_ratio:.1f}")
    if big and big.round_over_carry:
        check("round of 10,000 x 64 KiB within 2.5x of mosquitto's carry time", big.round_over_carry <= 2.5,
              f"{big.round_s:.1f} s vs {big.carry_s:.2f} s, x{big.round_over_carry:.1f}")
    for base in sorted({r.setting.split(":")[0] for r in results if r.drain}):
        one, two = by.get(f"{base}:1w:drain"), by.get(f"{base}:2w:drain")
        if one and two and not all(r.error is None and r.exactly_once and r.acked_before_drain == 0 and r.drain_s
                                   for r in (one, two)):  # fmt: skip
            lines.append(f"- not comparable: {base} drains (a run failed, or updates were judged before its drain)")
        elif one and two and one.drain_s and two.drain_s:
            check(f"{base}: 2 workers drain a held round not slower than 1 (the generator's sending done)",
                  two.drain_s <= one.drain_s, f"{two.drain_s:.2f} s vs {one.drain_s:.2f} s, "
                  f"x{one.drain_s / two.drain_s:.2f} the updates per second")  # fmt: skip
    for base in sorted({r.setting.split(":")[0] for r in results if r.workers and not r.drain}):
        one, two, alone = by.get(f"{base}:1w"), by.get(f"{base}:2w"), by.get(base)
        if one and two and one.round_s and two.round_s:
            check(f"{base}: 2 workers not slower than 1 in a round (the generator on the same cores)",
                  two.round_s <= one.round_s, f"{two.round_s:.1f} s vs {one.round_s:.1f} s")
        elif alone and two and alone.round_s and two.round_s:  # no 1-worker run: the hub alone is one process
            check(f"{base}: 2 workers not slower than the hub alone in a round (the generator on the same cores)",
                  two.round_s <= alone.round_s, f"{two.round_s:.1f} s vs {alone.round_s:.1f} s")
    return lines


def _as_json(result: SettingResult) -> dict[str, Any]:
    """The result's fields, plus its CPU per update (ms) by process, round and carry."""
    def per_update(spent: dict[str, float]) -> dict[str, float]:
        return {name: round(1000 * value / result.devices, 3) for name, value in spent.items()}

    return {**dataclasses.asdict(result), "round_cpu_ms_per_update": per_update(result.round_cpu_s),
            "carry_cpu_ms_per_update": per_update(result.carry_cpu_s)}  # fmt: skip


def write_reports(results: list[SettingResult], out: Path, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hub_scale.json").write_text(json.dumps({"command": command, "results": [_as_json(r) for r in results]},
                                                   indent=2) + "\n")  # fmt: skip
    text = "\n".join([f"`{command}`", "", markdown_table(results), "", *targets(results)]) + "\n"
    (out / "hub_scale.md").write_text(text)
    return text


# ====================================================================== the carry subscriber
def carry_subscriber(port: int, expected: int) -> None:
    """Subprocess: count ``expected`` messages on ``bench/carry/#``, print first/last arrival."""
    import paho.mqtt.client as mqtt

    times: list[float] = []
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties=None) -> None:
        client.subscribe(f"{_CARRY_PREFIX}/#", qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties=None) -> None:
        print("ready", flush=True)

    def on_message(client, userdata, message) -> None:
        times.append(time.monotonic())
        if len(times) == expected:
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-carry", protocol=mqtt.MQTTv5)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(LOOPBACK, port, keepalive=600)
    client.loop_start()
    done.wait()
    print(json.dumps({"first": times[0], "last": times[-1], "count": len(times)}), flush=True)
    client.disconnect()
    client.loop_stop()


# ====================================================================== command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Settings are DEVICESxSIZE[:Kw][:drain]: devices, update size (B, KiB, "
                                     "MiB), hub workers (none: the hub alone) and whether the workers drain a round "
                                     "the broker holds (stopped until every update is there, then timed).")
    parser.add_argument("--settings", type=parse_settings, default=parse_settings(DEFAULT_SETTINGS),
                        help=f"comma-separated settings to run (default: {DEFAULT_SETTINGS})")
    parser.add_argument("--out", type=Path, default=Path("work/bench/hub-scale"), help="folder for the reports")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each phase of a setting may take")
    parser.add_argument("--window", type=int, default=256, help="uploads on their way to the broker at once")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--py-spy", metavar="PATH", help="profile the hub, workers and generator over each round "
                        "with this py-spy (collapsed stacks in each setting's folder; slows the round)")
    parser.add_argument("--carry-subscriber", nargs=2, type=int, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.carry_subscriber:
        carry_subscriber(*args.carry_subscriber)
        return 0
    needed = max(s.devices for s in args.settings) + 256
    limit = raise_open_files_limit(needed)
    if limit < needed:
        print(f"error: {needed} open files are needed for {needed - 256} devices, but the hard limit is {limit}; "
              "raise it (ulimit -Hn as root) or run fewer devices", file=sys.stderr)  # fmt: skip
        return 2
    command = "python benchmarks/hub_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    for setting in tqdm(args.settings, desc="settings", unit="setting", disable=args.no_progress):
        result = run_setting(setting, args.out, timeout=args.timeout, window=args.window,
                             show_progress=not args.no_progress, py_spy=args.py_spy)  # fmt: skip
        results.append(result)
        tqdm.write(f"{setting.label}: open {result.round_open_s}, round {result.round_s}, accepted "
                   f"{result.accepted_devices}/{setting.devices}, exactly once {result.exactly_once}"
                   + (f", error {result.error}" if result.error else ""))  # fmt: skip
        write_reports(results, args.out, command)
    print(write_reports(results, args.out, command))
    return 0 if all(r.exactly_once and r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
