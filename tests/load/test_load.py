"""Load: bursts of drops, a storm of scrapes, an inbox full of clutter. The daemon must stay responsive, correct and
within memory. (How fast is measured in bench/, not here: these assert behaviour under load.)
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, wait_for

MEMORY_LIMIT_MB = 150  # the bench measures ~40 MB idle; this only catches a leak or an unbounded queue


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProcess(tmp_path / "d", max_concurrent_jobs=4)
    yield d
    d.stop(signal.SIGKILL) if d.proc and d.proc.poll() is None else None


def test_fifty_datasets_dropped_within_a_second_all_run_once(daemon):
    daemon.start()
    names = [f"burst{i:02d}" for i in range(50)]
    staged = []
    for name in names:  # built first, then all moved in at once
        staged.append(daemon.drop(name, {"epochs": 1}, fake={"sleep": 0.01}))
    health = []

    def poll_health():
        for _ in range(20):
            health.append(daemon.get("/healthz")[0])

    t = threading.Thread(target=poll_health)
    t.start()
    jobs = daemon.wait_jobs(50, timeout=180)
    t.join()
    assert [j["name"] for j in jobs] == names  # claimed in the order they were dropped
    starts = [j["started_at"] for j in jobs]
    assert starts == sorted(starts)  # and started first in, first out (4 at a time)
    assert all(j["state"] == "succeeded" for j in jobs)
    assert all(len(daemon.runs(j["id"])) == 1 for j in jobs)
    assert health and set(health) == {200}
    assert rss_mb(daemon.proc.pid) < MEMORY_LIMIT_MB


def test_a_thousand_scrapes_while_a_job_runs(daemon):
    daemon.start()
    daemon.drop("busy", {"epochs": 30}, fake={"sleep": 0.05})
    wait_for(lambda: (j := daemon.jobs()) and j[0]["state"] == "running", 30, what="job running")
    seen_epochs = set()
    for _ in range(1000):
        samples = daemon.scrape()
        for (name, _labels), value in samples.items():
            if name == "dropfit_job_epoch":
                seen_epochs.add(value)
    [job] = daemon.wait_jobs(1, timeout=60)
    assert job["state"] == "succeeded" and job["epoch"] == 30
    assert len(seen_epochs) > 3  # the scrapes saw training move on
    assert rss_mb(daemon.proc.pid) < MEMORY_LIMIT_MB


def test_ten_thousand_unrelated_files_in_the_inbox_are_ignored(daemon):
    daemon.inbox.mkdir(parents=True)
    for i in range(5_000):  # present at start-up ...
        (daemon.inbox / f"clutter-{i:05d}.txt").write_bytes(b"x")
    daemon.start()
    for i in range(5_000, 10_000):  # ... and arriving while it runs
        (daemon.inbox / f"clutter-{i:05d}.dat").write_bytes(b"x")
    daemon.drop("real", {"epochs": 2})
    [job] = daemon.wait_jobs(1, timeout=60)
    assert job["state"] == "succeeded"
    samples = daemon.scrape()
    assert samples[("dropfit_inbox_pending", ())] == 0  # clutter is never waited on
    assert len(os.listdir(daemon.inbox)) == 10_000  # and never touched
    assert rss_mb(daemon.proc.pid) < MEMORY_LIMIT_MB
    assert daemon.proc.poll() is None


def _many_files(folder: Path, count: int) -> None:
    """``count`` small files in 10 class folders, and a job.yaml: built outside the inbox, moved in at once."""
    for c in range(10):
        (folder / f"class{c}").mkdir(parents=True)
    (folder / "job.yaml").write_text("epochs: 1\n")
    (folder / "fake.json").write_text('{"read_all": true}')
    payload = b"\x89PNG\r\n\x1a\n" + b"\0" * 56
    for i in range(count):
        fd = os.open(folder / f"class{i % 10}" / f"{i:06d}.png", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, payload)
        os.close(fd)


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_a_hundred_thousand_file_drop_is_claimed_once_without_losing_events(tmp_path, observer):
    """A recursive watch once followed the claimed dataset and overflowed the kernel's queue while the trainer read
    it (60,000 files). Now only the inbox's top level is watched, and a settling folder is judged by a rescan."""
    d = DaemonProcess(tmp_path / "d", observer={"kind": observer, "interval": 0.5}, settle_seconds=1.0)
    try:
        d.start()
        staging = tmp_path / "big"
        _many_files(staging, 100_000)
        os.rename(staging, d.inbox / "big")
        d.drop("after", {"epochs": 1}, fake={"read_all": True})  # a drop behind it must still be seen
        jobs = {j["name"]: j for j in d.wait_jobs(2, timeout=300)}
        assert sorted((name, j["state"]) for name, j in jobs.items()) == [("after", "succeeded"), ("big", "succeeded")]
        assert len(d.jobs()) == 2  # each claimed once
        assert "read 100002 files" in (d.outbox / jobs["big"]["id"] / "train.log").read_text()
        assert "overflow" not in d.log().lower()
        assert rss_mb(d.proc.pid) < MEMORY_LIMIT_MB
    finally:
        d.stop(signal.SIGKILL)


def test_a_real_inotify_queue_overflow_loses_no_drop(tmp_path):
    """A real IN_Q_OVERFLOW: while the daemon is stopped (SIGSTOP) more changes happen at the inbox's top level than
    the kernel queues for it (max_queued_events), then two drops arrive, whose events the kernel drops. The
    overflow itself must make the daemon look at the whole top level again — the periodic look is an hour away."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    d = DaemonProcess(tmp_path / "d", observer={"kind": "inotify", "rescan_seconds": 3600}, settle_seconds=0.5)
    try:
        d.start()
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            for i in range(limit + 100):  # hidden names: never jobs, but each one a queued event
                os.mkdir(d.inbox / f".flood-{i}")
            for name in ("after-1", "after-2"):
                d.drop(name, {"epochs": 1})
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        jobs = d.wait_jobs(2, timeout=60)
        assert sorted((j["name"], j["state"]) for j in jobs) == [("after-1", "succeeded"), ("after-2", "succeeded")]
        assert "the watcher lost events (its queue overflowed): found 2 drop(s)" in d.log()
    finally:
        d.stop(signal.SIGKILL)


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_an_inbox_folder_replaced_under_the_daemon_is_watched_again(tmp_path, observer):
    """`rm -rf inbox && mkdir inbox`, or a share remounted: the old watch is on a folder that is gone. The daemon
    notices at its next look at the inbox and watches the new folder; drops in it run."""
    d = DaemonProcess(tmp_path / "d", observer={"kind": observer, "interval": 0.3, "rescan_seconds": 1.0})
    try:
        d.start()
        shutil.rmtree(d.inbox)
        d.inbox.mkdir()
        d.drop("first", {"epochs": 1})
        [first] = d.wait_jobs(1, timeout=30)
        assert first["state"] == "succeeded", first
        if observer == "inotify":  # the watch died with the old folder (polling lists the path, whatever it is)
            assert f"watching {d.inbox} again" in d.log()
        d.drop("second", {"epochs": 1})
        jobs = d.wait_jobs(2, timeout=60)
        assert sorted((j["name"], j["state"]) for j in jobs) == [("first", "succeeded"), ("second", "succeeded")]
    finally:
        d.stop(signal.SIGKILL)
