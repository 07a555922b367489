"""The hub (or a hub worker) SIGKILLed mid-round at scale, with devices that never re-send.

Issue 16's crash test at full size: N devices (1,000 by default) from one process, each on
its own MQTT connection, send one signed update each as soon as round 1 opens; when half of
them have their ``accepted`` ack, the hub process (``--kill hub``) or worker 0 of the hub's
workers (``--kill worker``) is SIGKILLed, and started again on the same state dir a moment
later. The devices never send again (no timer, no reaction to the hub coming back), so
every update the dead process had not judged must come back from the broker (manual
acknowledgements, persistent sessions). It asserts and prints:

- the kill came mid-intake: fewer than N updates acknowledged and committed when it died;
- the round completes: the global version is published and every device got its ack;
- every update counted once: N receipts, no duplicate refusals, and the published global
  equals the sample-weighted mean of the N updates (max relative error below 1e-6);

    python benchmarks/hub_kill.py --out work/bench/hub-kill                    # the hub, 1,000 devices
    python benchmarks/hub_kill.py --kill worker --workers 2 --out work/bench/hub-kill
    make bench-hub-kill

Writes ``hub_kill.json`` and ``hub_kill.md`` under ``--out``; exit status 1 if a check
failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # run as a script: tests/ and the swarm are siblings
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from device_swarm import Swarm, UpdateRecipe, raise_open_files_limit  # noqa: E402
from hub_scale import (  # noqa: E402
    FEDERATION,
    BenchMosquitto,
    MeasuredProcess,
    Observer,
    Setting,
    hub_command,
    max_relative_error,
    worker_command,
)

from fedvlm.hub.clients import register_clients  # noqa: E402
from fedvlm.hub.store import HubStore  # noqa: E402
from fedvlm.shared import tensor_codec  # noqa: E402
from fedvlm.shared.protocol import Topics  # noqa: E402
from tests.brokers import LOOPBACK  # noqa: E402

_DOWN_S = 1.0  # how long the killed process stays dead: the devices go on sending meanwhile


@dataclasses.dataclass
class KillResult:
    devices: int
    update_bytes: int
    workers: int
    killed: str  # "hub" or "worker 0"
    acknowledged_at_kill: int = 0  # devices with their accepted ack when the SIGKILL went out
    committed_at_kill: int = 0  # receipts in the database once the process was reaped
    uploads_delivered_at_kill: int = 0  # updates the broker had from the devices then
    round_s: float | None = None  # round open -> global published, the kill and restart included
    after_restart_s: float | None = None  # restart -> global published
    devices_accepted: int = 0
    receipts: int | None = None
    distinct_receipts: int | None = None
    duplicate_refusals: int | None = None
    global_max_rel_error: float | None = None
    refusal_resends: int = 0  # "not now" refusals answered (the devices' only re-send)
    checks: dict[str, bool] = dataclasses.field(default_factory=dict)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(self.checks.values())


def run_kill(devices: int, update_bytes: int, workers: int, kill: str, out: Path, *, timeout: float = 600.0,
             window: int = 256) -> KillResult:  # fmt: skip
    """One round with one SIGKILL and restart; every process it starts is stopped before it returns."""
    setting = Setting(devices, update_bytes, workers)
    result = KillResult(devices, update_bytes, workers, "hub" if kill == "hub" else "worker 0")
    work = out / f"{setting.label.replace(':', '-')}-kill-{kill}"
    work.mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="hub-", dir=work))
    recipe = UpdateRecipe(update_bytes)
    ids = [f"d{index:06d}" for index in range(devices)]
    secrets = register_clients(state_dir, ids)
    broker = BenchMosquitto(work / "mosquitto").start()
    url = broker.broker.url
    swarm = observer = None
    processes: dict[str, MeasuredProcess] = {}

    def spawn(name: str) -> MeasuredProcess:
        if name == "hub":
            command = hub_command(setting, url, state_dir)
        else:
            command = worker_command(setting, url, state_dir, int(name.split("-")[1]))
        processes[name] = MeasuredProcess.spawn(command, work / f"{name}.log")
        return processes[name]

    try:
        observer = Observer(broker.broker.address, Topics(FEDERATION))
        swarm = Swarm(LOOPBACK, broker.port, FEDERATION, [(i, secrets[i]) for i in ids], recipe, window=window)
        swarm.connect_all()
        if not swarm.wait(lambda c: c.announced >= devices, timeout):
            raise TimeoutError(f"only {swarm.counts.announced} of {devices} devices connected and announced")
        spawn("hub")
        for index in range(workers):
            spawn(f"worker-{index}")
        if not observer.opened.wait(timeout):
            raise TimeoutError(f"round 1 did not open within {timeout:.0f} s; see {work / 'hub.log'}")
        target = "hub" if kill == "hub" else "worker-0"
        deadline = time.monotonic() + timeout
        while swarm.counts.devices_accepted < devices // 2:  # polled finely: kill as soon as half are acked
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {swarm.counts.devices_accepted} of {devices} accepted before the kill")
            time.sleep(0.001)
        processes[target].process.send_signal(signal.SIGKILL)
        result.acknowledged_at_kill = swarm.counts.devices_accepted
        result.uploads_delivered_at_kill = swarm.counts.uploads_delivered
        processes[target].reap(10)
        with HubStore.in_state_dir(state_dir, create=False) as store:
            # With workers, the others go on committing: this counts what the round had then.
            result.committed_at_kill = len(store.receipts(1))
        print(f"killed the {result.killed} with {result.acknowledged_at_kill} of {devices} acknowledged, "
              f"{result.committed_at_kill} committed, {result.uploads_delivered_at_kill} delivered to the broker",
              flush=True)  # fmt: skip
        time.sleep(_DOWN_S)
        restarted = time.monotonic()
        spawn(target)
        swarm.wait(lambda c: observer.published.is_set() and c.devices_accepted >= devices, timeout)
        if observer.published_at is not None and observer.opened_at is not None:
            result.round_s = observer.published_at - observer.opened_at
            result.after_restart_s = observer.published_at - restarted
        if not processes["hub"].reap(120):
            raise TimeoutError("the hub did not finish its one round")
    except Exception as error:  # reported; the checks below then fail
        result.error = f"{type(error).__name__}: {error}"
    finally:
        for process in processes.values():
            process.stop()
        if swarm is not None:
            result.devices_accepted = swarm.counts.devices_accepted
            result.refusal_resends = swarm.counts.resends
            swarm.close()
        if observer is not None:
            observer.close()
        broker.stop()
    _check(result, state_dir, recipe)
    return result


def _check(result: KillResult, state_dir: Path, recipe: UpdateRecipe) -> None:
    try:
        with HubStore.in_state_dir(state_dir, create=False) as store:
            receipts = store.receipts(1)
            result.receipts = len(receipts)
            result.distinct_receipts = len({receipt.client_id for receipt in receipts})
            result.duplicate_refusals = store.rejection_counts().get("duplicate", 0)
            latest = store.latest_global()
            if latest is not None and latest.published:
                tensors, _ = tensor_codec.decode(Path(latest.file_path).read_bytes())
                result.global_max_rel_error = max_relative_error(tensors,
                                                                 recipe.expected_mean(range(result.devices)))
    except Exception as error:
        result.error = result.error or f"reading the hub's state: {error}"
    n = result.devices
    result.checks = {
        "killed mid-intake (fewer than N acknowledged and committed)": (
            n // 2 <= result.acknowledged_at_kill < n and result.committed_at_kill < n),
        "the round completed (global published, every device acknowledged)": (
            result.global_max_rel_error is not None and result.devices_accepted == n),
        "every update counted once (N receipts, no duplicates)": (
            result.receipts == result.distinct_receipts == n and result.duplicate_refusals == 0),
        "global = sample-weighted mean of all N (max rel. error < 1e-6)": (
            result.global_max_rel_error is not None and result.global_max_rel_error < 1e-6),
    }  # fmt: skip


def report(results: list[KillResult], command: str) -> str:
    lines = [f"`{command}`", "",
             "| killed | devices | update | workers | acked at kill | committed at kill | round (s) | after restart (s) "
             "| accepted | receipts (distinct) | duplicates | global max rel. error | refusal re-sends | passed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        error = "—" if r.global_max_rel_error is None else f"{r.global_max_rel_error:.1e}"
        seconds = ["—" if value is None else f"{value:.1f}" for value in (r.round_s, r.after_restart_s)]
        lines.append(f"| {r.killed} | {r.devices:,} | {r.update_bytes // 1024:,} KiB | {r.workers or 'hub alone'} | "
                     f"{r.acknowledged_at_kill:,} | {r.committed_at_kill:,} | {seconds[0]} | {seconds[1]} | "
                     f"{r.devices_accepted:,} | {r.receipts} ({r.distinct_receipts}) | {r.duplicate_refusals} | "
                     f"{error} | {r.refusal_resends} | {'✓' if r.passed else '✗'} |")  # fmt: skip
    for r in results:
        lines += ["", f"{r.killed}, {r.devices:,} devices:"]
        lines += [f"- {'holds' if ok else 'FAILS'}: {label}" for label, ok in r.checks.items()]
        if r.error:
            lines.append(f"- error: {r.error}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="devices in the round (default: 1000)")
    parser.add_argument("--update-size", default="64KiB", help="each update's size in B, KiB or MiB (default: 64KiB)")
    parser.add_argument("--kill", choices=("hub", "worker", "both"), default="hub",
                        help="what to SIGKILL when half the updates are acknowledged: the hub, worker 0 of the "
                             "hub's workers, or each in its own run (default: hub)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None,
                        help="hub workers (default: none when killing the hub, 2 when killing a worker)")
    parser.add_argument("--out", type=Path, default=Path("work/bench/hub-kill"), help="folder for the reports")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each phase may take")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        update_bytes = Setting.parse(f"1x{args.update_size}").update_bytes
    except argparse.ArgumentTypeError:
        parser.error(f"--update-size {args.update_size!r}: write a size in B, KiB or MiB, e.g. 64KiB")
    if args.devices < 2:
        parser.error("--devices: at least 2 (half of them are acknowledged before the kill)")
    if args.kill != "hub" and args.workers == 0:
        parser.error("--kill worker needs hub workers: leave --workers out or give 2 or more")
    needed = args.devices + 256
    if raise_open_files_limit(needed) < needed:
        print(f"error: {needed} open files are needed for {args.devices} devices; raise the hard limit "
              "(ulimit -Hn as root) or run fewer devices", file=sys.stderr)  # fmt: skip
        return 2
    kills = ("hub", "worker") if args.kill == "both" else (args.kill,)
    command = "python benchmarks/hub_kill.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    for kill in kills:
        workers = args.workers if args.workers is not None else (0 if kill == "hub" else 2)
        results.append(run_kill(args.devices, update_bytes, workers, kill, args.out, timeout=args.timeout))
        text = report(results, command)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hub_kill.json").write_text(json.dumps({"command": command, "results": [
            {**dataclasses.asdict(r), "passed": r.passed} for r in results]}, indent=2) + "\n")  # fmt: skip
        (args.out / "hub_kill.md").write_text(text)
    print(text)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
