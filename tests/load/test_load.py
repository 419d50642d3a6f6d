"""Load: bursts of drops, a storm of scrapes, an inbox full of clutter. The daemon must stay responsive, correct and
within memory. (How fast is measured in bench/, not here: these assert behaviour under load.)
"""

from __future__ import annotations

import os
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
    assert sorted(j["name"] for j in jobs) == names
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
