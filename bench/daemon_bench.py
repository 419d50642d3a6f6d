"""Daemon overhead: settle-to-start latency, idle CPU, resident memory, scanning and validating 100,000 files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _start(folder: Path, **config) -> tuple[subprocess.Popen, dict]:
    (folder / "config.yaml").write_text(yaml.safe_dump({"metrics": {"port": 0}, **config}))
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve", "--config", str(folder / "config.yaml")],
                            stdout=subprocess.DEVNULL, stderr=(folder / "daemon.log").open("w"), cwd=ROOT)
    for _ in range(300):
        try:
            info = json.loads((folder / "state" / "daemon.json").read_text())
            if info["pid"] == proc.pid:
                return proc, info
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError("daemon did not start")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def idle(seconds: float = 60.0) -> dict:
    """CPU% and resident memory of a daemon with nothing to do."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, _ = _start(Path(tmp))
        try:
            time.sleep(2)
            before, start = _cpu_seconds(proc.pid), time.monotonic()
            time.sleep(seconds)
            cpu = 100 * (_cpu_seconds(proc.pid) - before) / (time.monotonic() - start)
            return {"idle_cpu_percent": round(cpu, 3), "rss_mb": round(_rss_mb(proc.pid), 1)}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def latency(settle: float = 1.0) -> dict:
    """From the moment a dropped folder has settled (last write + settle_seconds) to the trainer process starting,
    and to its first epoch starting (the trainer's log line before fit; TensorFlow's import is in there)."""
    from trainer.data.demo import make_shapes

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proc, _ = _start(folder, settle_seconds=settle)
        try:
            staging = make_shapes(folder / "staging" / "drop", classes=2, per_class=8, size_range=(24, 32),
                                  job={"target_size": 24, "epochs": 1, "model": {"architecture": "recipe"}})
            os.rename(staging, folder / "inbox" / "drop")
            settled = time.time() + settle
            status = None
            for _ in range(1200):
                found = list((folder / "outbox").glob("*/status.json"))
                if found:
                    status = json.loads(found[0].read_text())
                    if status["state"] in ("succeeded", "failed"):
                        break
                time.sleep(0.05)
            log = (found[0].parent / "train.log").read_text()
            match = re.search(r"^(\S+ \S+) INFO \S+ trainer\.train: phase ", log, re.M)
            first_epoch = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None
            return {"settle_to_trainer_start_s": round(status["started_at"] - settled, 3),
                    "settle_to_first_epoch_s": round(first_epoch - settled, 2) if first_epoch else None,
                    "job_state": status["state"]}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def scan_and_validate(root: Path) -> dict:
    """The trainer's scan of every file plus the daemon's spec validation, on a 100,000-file dataset, twice: the first
    pass reads from disk unless the files are in the page cache (a dataset just copied in usually is), the second
    from the page cache."""
    from daemon.intake import validate
    from trainer.data.scan import scan_directory

    out = {}
    for key in ("scan_validate_s", "scan_validate_warm_s"):
        start = time.perf_counter()
        _spec, error = validate(root)
        scan = scan_directory(root)
        out[key] = round(time.perf_counter() - start, 2)
    files = len(scan.samples) + len(scan.skipped)
    return {"files": files, **out, "files_per_second": round(files / out["scan_validate_s"]),
            "files_per_second_warm": round(files / out["scan_validate_warm_s"]), "valid": error is None}


def _linked_copy(src: Path, dst: Path) -> None:
    """A copy of a big tree made of hard links (seconds, no data copied), to move into an inbox."""
    for dirpath, _dirs, files in os.walk(src):
        target = dst / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name != ".complete":
                os.link(os.path.join(dirpath, name), target / name)


def big_drop(root: Path, observer: str = "inotify", settle: float = 5.0) -> dict:
    """A dataset of many files moved into the inbox: seconds until it is claimed (settle_seconds included), and
    whether the watcher lost events. The stand-in trainer of the tests reads every file, as a real scan does."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fake = [sys.executable, str(ROOT / "tests" / "fake_trainer.py")]
        proc, _ = _start(folder, settle_seconds=settle, trainer_command=fake,
                         observer={"kind": observer, "interval": 2.0})
        try:
            _linked_copy(root, folder / "staging" / "big")
            (folder / "staging" / "big" / "fake.json").write_text('{"read_all": true}')
            moved = time.time()
            os.rename(folder / "staging" / "big", folder / "inbox" / "big")
            status = None
            for _ in range(12000):
                found = list((folder / "outbox").glob("*/status.json"))
                if found and status is None:
                    claimed = time.time()
                    status = json.loads(found[0].read_text())
                if found and json.loads(found[0].read_text())["state"] in ("succeeded", "failed"):
                    break
                time.sleep(0.02)
            log = (folder / "daemon.log").read_text()
            return {"files": sum(len(f) for _, _, f in os.walk(folder / "archive")),
                    "moved_to_claimed_s": round(claimed - moved, 2), "settle_seconds": settle,
                    "overflow_warnings": log.lower().count("overflow"),
                    "state": json.loads(found[0].read_text())["state"]}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def polling_cost(root: Path, interval: float = 2.0, seconds: float = 30.0) -> dict:
    """CPU the daemon spends per polling interval (observer.kind polling, as on network shares) while a folder of
    many files sits in the inbox (here: waiting for its job.yaml). Only the inbox's top level is listed."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proc, _ = _start(folder, observer={"kind": "polling", "interval": interval})
        try:
            _linked_copy(root, folder / "inbox" / "waiting")
            (folder / "inbox" / "waiting" / "job.yaml").unlink()
            time.sleep(5.0 + interval * 3)  # past settle_seconds (5 s by default): it is waiting for a job.yaml
            before, start = _cpu_seconds(proc.pid), time.monotonic()
            time.sleep(seconds)
            cpu = _cpu_seconds(proc.pid) - before
            intervals = (time.monotonic() - start) / interval
            return {"polling_cpu_ms_per_interval": round(1000 * cpu / intervals, 2), "polling_interval_s": interval}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def slurm_latency(jobs: int = 5) -> dict:
    """Submit-to-running on a real one-node Slurm cluster on localhost (tests/slurm_cluster.py; needs Debian's
    slurmctld, slurmd, slurm-client, munge and root): from the moment the daemon hands a job to sbatch (recorded as
    the job's start) to the trainer process running on the node. Jobs are dropped one after another."""
    import shutil as _shutil
    import statistics

    sys.path.insert(0, str(ROOT / "tests"))
    from slurm_cluster import REQUIRED_BINARIES, SlurmCluster

    if os.geteuid() != 0 or any(_shutil.which(b) is None for b in REQUIRED_BINARIES):
        return {"slurm_submit_to_running_s": None, "slurm_note": "needs root and Slurm (see .ci/run)"}
    fake = [sys.executable, str(ROOT / "tests" / "fake_trainer.py")]
    with SlurmCluster(cpus=2) as cluster, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["SLURM_CONF"] = str(cluster.conf)
        try:
            proc, _ = _start(folder, settle_seconds=0.2, trainer_command=fake, max_concurrent_jobs=10,
                             runner={"kind": "slurm", "poll_interval": 0.5, "slurm": {"cpus_per_job": 1}})
        finally:
            del os.environ["SLURM_CONF"]
        try:
            from trainer.data.demo import make_shapes

            waits = []
            for i in range(jobs):
                staging = make_shapes(folder / "staging" / f"s{i}", classes=2, per_class=2, size_range=(16, 20),
                                      job={"epochs": 1})
                os.rename(staging, folder / "inbox" / f"s{i}")
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    runs = list((folder / "outbox").glob(f"s{i}-*/fake_runs.jsonl"))
                    status = list((folder / "outbox").glob(f"s{i}-*/status.json"))
                    if runs and status:
                        started = json.loads(status[0].read_text())["started_at"]
                        waits.append(json.loads(runs[0].read_text().splitlines()[0])["time"] - started)
                        break
                    time.sleep(0.02)
            return {"slurm_submit_to_running_s": round(statistics.median(waits), 2),
                    "slurm_submit_to_running_max_s": round(max(waits), 2), "slurm_jobs": len(waits)}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def idle_with_history(finished: int = 1000, seconds: float = 30.0) -> dict:
    """Idle CPU of a daemon whose ledger holds ``finished`` succeeded jobs, with a polled inbox (observer.kind:
    polling, as on shared storage): what stays constant however long the daemon has been in service."""
    from daemon.ledger import JobState, Ledger

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ledger = Ledger(folder / "state" / "ledger.sqlite3")
        now = time.time()
        for i in range(finished):
            job_id = f"old{i:05d}-20261127T000000Z-000000"
            ledger.restore({"id": job_id, "name": f"old{i:05d}", "state": JobState.SUCCEEDED.value, "attempt": 1,
                            "source": None, "path": None, "created_at": now - 86400 + i, "epoch": 10,
                            "epochs": 10, "outcome": "succeeded", "finished_at": now - 3600})
            status = folder / "outbox" / job_id / "status.json"
            status.parent.mkdir(parents=True)
            status.write_text(json.dumps({"id": job_id, "state": "succeeded"}))
        ledger.close()
        proc, _ = _start(folder, observer={"kind": "polling", "interval": 2.0})
        try:
            time.sleep(5)
            before, start = _cpu_seconds(proc.pid), time.monotonic()
            time.sleep(seconds)
            cpu = 100 * (_cpu_seconds(proc.pid) - before) / (time.monotonic() - start)
            return {"idle_cpu_percent_with_history": round(cpu, 3), "history_jobs": finished,
                    "rss_mb_with_history": round(_rss_mb(proc.pid), 1)}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
