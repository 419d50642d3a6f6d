"""Faults a GPU box really has: the daemon killed at any moment, a full disk, a corrupt ledger, no inotify.

(Trainer crashes, OOM-like kills, hangs and SIGTERM are in tests/test_daemon.py; kill -9 with the real trainer in
tests/test_daemon_e2e.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
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
from trainer.data.demo import make_shapes


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
        assert "(polling, top level only)" in d.log()
        d.drop("polled", {"epochs": 2})
        [job] = d.wait_jobs(1, timeout=30)
        assert job["state"] == "succeeded"
    finally:
        d.stop()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _small_disk(tmp_path, where: str, size: str = "3m"):
    """A small tmpfs at ``where`` under the daemon's root folder."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    root = tmp_path / "d"
    mount = root / where
    try:
        _mount_tmpfs(mount, size)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    yield root, mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(params=["outbox", "state/jobs"])
def small_disk(tmp_path, request):
    """The outbox, or state/jobs (claimed datasets and the trainers' work folders, which hold three copies of the
    weights), on a small tmpfs."""
    yield from _small_disk(tmp_path, request.param, "3m" if request.param == "outbox" else "16m")


@pytest.fixture
def small_state(tmp_path):
    """The whole state folder, ledger included, on a 3 MB tmpfs."""
    yield from _small_disk(tmp_path, "state")


def test_disk_full_fails_the_job_with_the_reason_cleans_up_and_the_next_job_succeeds(small_disk):
    root, small = small_disk
    d = DaemonProcess(root, trainer_command=None, retries=1)
    spec = {"target_size": 32, "epochs": 2, "batch_size": 8, "model": {"architecture": "recipe"},
            "augmentation": {"enabled": False}}
    try:
        d.start()
        filler = small / "filler"
        free = shutil.disk_usage(small).free
        filler.write_bytes(b"\0" * (free - 96 * 1024))  # room for a status, a log line, a ledger page: not a model
        d.drop("too-big", spec, per_class=8, size_range=(24, 40))
        [job] = d.wait_jobs(1, timeout=300)
        assert job["state"] == "failed" and job["error_kind"] == "io", job
        assert "no space left on device" in job["error"].lower()
        named = Path(job["error"].split("no space left on device: ", 1)[1].split()[0])
        assert named.is_relative_to(small), f"{named} is not on the full filesystem {small}"  # the real culprit
        assert job["attempt"] == 1  # a full disk is not retried: it would fail the same way
        out = d.outbox / job["id"]
        assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]  # no partial files left
        assert not (d.state / "jobs" / job["id"] / "work").exists()  # its checkpoints freed too
        assert Path(job["path"]).is_dir()  # the dataset is kept
        assert d.proc.poll() is None
        filler.unlink()
        d.drop("after", spec, per_class=8, size_range=(24, 40))
        jobs = d.wait_jobs(2, timeout=300)
        assert jobs[1]["state"] == "succeeded", (jobs[1]["error"], d.log()[-3000:])
        assert (d.outbox / jobs[1]["id"] / "model.keras").is_file()
    finally:
        d.stop(signal.SIGKILL)


@pytest.fixture
def small_outbox(tmp_path):
    yield from _small_disk(tmp_path, "outbox", "64m")


def _fill_when_exports_begin(out: Path, stop) -> None:
    """Wait for the trainer's first export (its temporary folder appears in the job's outbox), then take every free
    byte of that filesystem at once (fallocate): the disk fills up in the middle of the export."""
    while not stop.is_set():
        if any(p.name.startswith(".export-") for p in out.glob("*/.export-*")):
            fd = os.open(out / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                os.posix_fallocate(fd, 0, shutil.disk_usage(out).free - 4096)
            finally:
                os.close(fd)
            return
        time.sleep(0.005)


def test_a_disk_that_fills_up_during_an_export_fails_the_job_as_a_full_disk(small_outbox):
    """The model and reports are written, then the outbox fills up while an export is written: the job fails kind
    `io` naming the full filesystem (not as a broken converter), is not retried, and leaves no partial export."""
    import threading

    root, small = small_outbox
    d = DaemonProcess(root, trainer_command=None, retries=1)
    spec = {"target_size": 32, "epochs": 1, "batch_size": 8, "model": {"architecture": "recipe"},
            "augmentation": {"enabled": False}, "exports": ["savedmodel", "onnx"]}
    stop = threading.Event()
    filler = threading.Thread(target=_fill_when_exports_begin, args=(d.outbox, stop), daemon=True)
    try:
        d.start()
        filler.start()
        d.drop("exports", spec, per_class=8, size_range=(24, 40))
        [job] = d.wait_jobs(1, timeout=300)
        assert (small / "filler").exists(), "the disk was never filled: the test proves nothing"
        assert job["state"] == "failed" and job["error_kind"] == "io", job
        assert "no space left on device" in job["error"].lower(), job["error"]
        assert job["attempt"] == 1  # not retried: the same disk would fail the same way
        out = d.outbox / job["id"]
        assert (out / "model.keras").is_file()
        assert not [p.name for p in out.iterdir() if p.name.startswith((".export-", ".tmp-"))]
        assert not (out / "savedmodel").exists() and not (out / "model.onnx").exists()
        assert d.proc.poll() is None
    finally:
        stop.set()
        d.stop(signal.SIGKILL)


def test_a_full_state_folder_starts_nothing_loses_nothing_and_recovers_when_space_is_freed(small_state):
    """With the ledger's own disk full nothing can be recorded: once, a trainer was started at every tick because
    its start could not be written down. Now nothing starts, the drop waits in the inbox, and the daemon serves on."""
    root, small = small_state
    d = DaemonProcess(root, retries=1)
    try:
        d.start()
        filler = small / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):  # every last block
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        d.drop("waits", {"epochs": 2})
        wait_for(lambda: "cannot be written" in d.log(), 30, what="the ledger error")
        # The error is logged when the drop's intake has been tried and failed, after the point where a claim (or a
        # start) would have happened; the daemon holds the drop as pending again, to be taken in once it can.
        wait_for(lambda: d.scrape()[("dropfit_inbox_pending", ())] == 1, 10, what="the drop held as pending",
                 show=d.describe)
        assert d.jobs() == [] and (d.inbox / "waits").is_dir()  # not claimed, not lost
        assert not list(d.outbox.glob("*/fake_runs.jsonl"))  # no trainer started
        assert d.get("/healthz")[0] == 200 and d.proc.poll() is None
        filler.unlink()
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["epoch"] == 2
        assert len(d.runs(job["id"])) == 1
    finally:
        d.stop(signal.SIGKILL)


@pytest.fixture
def tmpfs_inbox(tmp_path):
    """The inbox on its own filesystem, as compose's separate bind mounts make it: every claim is a copy."""
    yield from _small_disk(tmp_path, "inbox", "400m")


def test_a_claim_across_filesystems_survives_kill_9_mid_copy(tmpfs_inbox):
    root, inbox = tmpfs_inbox
    d = DaemonProcess(root, settle_seconds=0.2)
    staging = inbox / ".staging"  # hidden: not a drop until it is renamed
    make_shapes(staging, classes=2, per_class=2, size_range=(16, 20), job={"epochs": 2})
    rng = random.Random(7)
    for i in range(300):  # 150 MB that take a while to copy
        (staging / "circle" / f"pad{i:03d}.bin").write_bytes(rng.randbytes(512 * 1024))
    before = {str(p.relative_to(staging)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in staging.rglob("*") if p.is_file()}
    try:
        d.start()
        os.rename(staging, inbox / "big")
        wait_for(lambda: list(d.state.glob("jobs/*/.dataset.partial")), 30, interval=0.002, what="the copy")
        d.kill9()
        assert [p.name for p in inbox.iterdir() if p.name.startswith(".dropfit-claim-")]  # caught mid-copy
        d.start()
        [job] = d.wait_jobs(1, timeout=120)
        assert job["state"] == "succeeded" and len(d.runs(job["id"])) == 1
        archived = d.archive / job["id"]
        after = {str(p.relative_to(archived)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in archived.rglob("*") if p.is_file()}
        assert after == before  # every byte, once
        assert list(inbox.iterdir()) == [] and not list(d.state.glob("jobs/*"))  # no hidden copy, no partial
    finally:
        d.stop(signal.SIGKILL)


@pytest.fixture
def small_jobs_dir(tmp_path):
    """Only state/jobs (where claimed datasets go) on a 2 MB tmpfs: a drop bigger than that cannot be claimed."""
    yield from _small_disk(tmp_path, "state/jobs", "2m")


def test_a_claim_or_extraction_that_runs_out_of_disk_fails_cleanly_and_loses_nothing(small_jobs_dir):
    root, small = small_jobs_dir
    d = DaemonProcess(root)
    try:
        d.start()
        staging = root / "staging" / "big"
        make_shapes(staging, classes=2, per_class=2, size_range=(16, 20), job={"epochs": 1})
        rng = random.Random(3)
        for i in range(40):  # 4 MB: more than the 2 MB the claim can copy
            (staging / "circle" / f"pad{i:02d}.bin").write_bytes(rng.randbytes(100_000))
        archive = shutil.make_archive(str(root / "staging" / "packed"), "zip", staging)
        os.rename(staging, d.inbox / "big")
        jobs = d.wait_jobs(1, timeout=60)
        os.rename(archive, d.inbox / "packed.zip")
        big, packed = d.wait_jobs(2, timeout=60)
        for job in (big, packed):  # our disk, not the user's data: failed (io), never "rejected"
            assert job["state"] == "failed" and job["error_kind"] == "io" and job["outcome"] == "failed", job
            assert "no space left on device: /" in job["error"], job["error"]
            assert len(job["error"]) < 1000  # one file named, not thousands
        assert "more file(s)" in big["error"] or "pad" in big["error"]
        hidden = Path(big["path"])
        assert hidden.parent == d.inbox and hidden.name.startswith(".dropfit-claim-")  # where the data is now
        assert len(list(hidden.rglob("*.bin"))) == 40  # all of it
        assert str(hidden) in (d.outbox / big["id"] / "error.txt").read_text()
        assert not list(small.rglob(".*.partial")) and not list(small.rglob(".*.extracting"))  # space given back
        assert jobs and d.get("/healthz")[0] == 200
    finally:
        d.stop(signal.SIGKILL)
