"""Faults a GPU box really has: the daemon killed at any moment, a full disk, a corrupt ledger, no inotify.

(Trainer crashes, OOM-like kills, hangs and SIGTERM are in tests/test_daemon.py; kill -9 with the real trainer in
tests/test_daemon_e2e.py.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, env_for_subprocess
from daemon_harness import DaemonProcess, wait_for


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProcess(tmp_path / "d")
    yield d
    d.stop(signal.SIGKILL) if d.proc and d.proc.poll() is None else None


def test_seeded_kill_9_loop_every_job_succeeds_exactly_once(daemon):
    rng = random.Random(20261126)
    names = [f"job{i:02d}" for i in range(10)]
    to_drop = list(names)
    kills = 0
    while kills < 15:
        daemon.start()
        for _ in range(rng.choice([0, 1, 2])):  # drops land at every stage: settling, claiming, queued, running
            if to_drop:
                daemon.drop(to_drop.pop(0), {"epochs": 8}, fake={"sleep": 0.05})
        time.sleep(rng.uniform(0.05, 1.2))
        daemon.kill9()
        kills += 1
    for name in to_drop:
        daemon.drop(name, {"epochs": 8}, fake={"sleep": 0.05})
    daemon.start()
    jobs = daemon.wait_jobs(10, timeout=180)
    assert sorted(j["name"] for j in jobs) == names  # none lost, none duplicated
    for job in jobs:
        assert job["state"] == "succeeded" and job["epoch"] == 8, job
        out = daemon.outbox / job["id"]
        assert (out / "model.keras").read_bytes() == b"fake model"
        finished = [json.loads(line) for line in (out / "fake_finished.jsonl").read_text().splitlines()]
        assert len(finished) == 1, f"{job['name']} finished {len(finished)} times"
        assert json.loads((out / "status.json").read_text())["state"] == "succeeded"
    assert not list(daemon.inbox.iterdir())  # every drop was claimed, no hidden half-claims left
    assert not list((daemon.state / "jobs").iterdir())  # finished jobs' state moved to the archive


def test_a_corrupt_ledger_is_moved_aside_and_rebuilt_from_the_outbox(daemon):
    daemon.start()
    daemon.drop("done-a", {"epochs": 2})
    daemon.drop("done-b", {"epochs": 2})
    daemon.wait_jobs(2)
    daemon.drop("long", {"epochs": 40}, fake={"sleep": 0.1})
    wait_for(lambda: (j := daemon.jobs()) and len(j) == 3 and j[2]["epoch"] >= 2, 30, what="long job at epoch 2")
    daemon.kill9()
    before = {j["id"]: j for j in daemon.jobs()}
    ledger = daemon.state / "ledger.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(str(ledger) + suffix).unlink(missing_ok=True)
    ledger.write_bytes(b"this is not a database" * 100)
    status = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(daemon.root / "config.yaml")],
                            capture_output=True, text=True, env=env_for_subprocess(), cwd=ROOT)
    assert status.returncode == 1 and "is unreadable" in status.stderr and "Traceback" not in status.stderr
    daemon.start()
    jobs = daemon.wait_jobs(3, timeout=60)
    log = daemon.log()
    assert "is unreadable" in log and "rebuilding it from" in log and "ledger rebuilt: 3 job(s) restored" in log
    assert [p.name.startswith("ledger.sqlite3.corrupt-") for p in daemon.state.iterdir()].count(True) == 1
    assert {j["id"]: j["state"] for j in jobs} == {i: "succeeded" for i in before}
    long = next(j for j in jobs if j["name"] == "long")
    runs = daemon.runs(long["id"])
    assert len(runs) == 2 and runs[1]["resumed_from"] >= 2  # resumed, not started over
    assert all(len(daemon.runs(i)) == 1 for i, j in before.items() if j["name"] != "long")


def test_a_corrupt_status_file_is_rewritten_from_the_ledger(daemon):
    daemon.start()
    daemon.drop("fine", {"epochs": 2})
    [job] = daemon.wait_jobs(1)
    daemon.stop()
    status = daemon.outbox / job["id"] / "status.json"
    status.write_text('{"id": "trunc')
    daemon.start()
    wait_for(lambda: "status.json was missing or unreadable; rewritten" in daemon.log(), 10, what="rewrite")
    assert json.loads(status.read_text())["state"] == "succeeded"


def test_the_polling_observer_starts_jobs_without_inotify(tmp_path):
    d = DaemonProcess(tmp_path / "d", observer={"kind": "polling", "interval": 0.2})
    try:
        d.start()
        assert "(polling)" in d.log()
        d.drop("polled", {"epochs": 2})
        [job] = d.wait_jobs(1, timeout=30)
        assert job["state"] == "succeeded"
    finally:
        d.stop()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


@pytest.fixture
def small_outbox(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        if os.environ.get("DROPFIT_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail("the disk-full test needs root to mount a tmpfs (CI runs as root)")
        pytest.skip("needs root to mount a small tmpfs")
    outbox = tmp_path / "d" / "outbox"
    try:
        _mount_tmpfs(outbox, "3m")
    except subprocess.CalledProcessError as exc:
        if os.environ.get("DROPFIT_REQUIRE_SYSTEM_TOOLS"):
            raise
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    yield outbox
    subprocess.run(["umount", "-l", str(outbox)], check=False)


def test_disk_full_fails_the_job_with_the_reason_cleans_up_and_the_next_job_succeeds(small_outbox):
    d = DaemonProcess(small_outbox.parent, trainer_command=None, retries=1)
    spec = {"target_size": 32, "epochs": 2, "batch_size": 8, "model": {"architecture": "recipe"},
            "augmentation": {"enabled": False}}
    try:
        d.start()
        filler = small_outbox / "filler"
        free = shutil.disk_usage(small_outbox).free
        filler.write_bytes(b"\0" * (free - 96 * 1024))  # room for status and logs, not for a model
        d.drop("too-big", spec, per_class=8, size_range=(24, 40))
        [job] = d.wait_jobs(1, timeout=300)
        assert job["state"] == "failed" and job["error_kind"] == "io", job
        assert "no space left on device" in job["error"].lower()
        assert job["attempt"] == 1  # a full disk is not retried: it would fail the same way
        out = small_outbox / job["id"]
        assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]  # no partial files left
        assert not (d.state / "jobs" / job["id"] / "work").exists()  # its checkpoints freed too
        assert Path(job["path"]).is_dir()  # the dataset is kept
        assert d.proc.poll() is None
        filler.unlink()
        d.drop("after", spec, per_class=8, size_range=(24, 40))
        jobs = d.wait_jobs(2, timeout=300)
        assert jobs[1]["state"] == "succeeded", jobs[1]
        assert (small_outbox / jobs[1]["id"] / "model.keras").is_file()
    finally:
        d.stop(signal.SIGKILL)
