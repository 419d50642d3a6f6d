"""The daemon as users run it: a real process, real folders and filesystem events, real HTTP scrapes.

Most tests use tests/fake_trainer.py (same command line and event protocol, no TensorFlow, instant); the tests at
the end run the real trainer.
"""

from __future__ import annotations

import json
import os
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


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_a_dropped_folder_becomes_a_finished_job_with_metrics(daemon):
    daemon.start()
    daemon.drop("flowers", {"epochs": 3})
    [job] = daemon.wait_jobs(1)
    assert job["state"] == "succeeded" and job["attempt"] == 1 and job["epoch"] == 3
    assert job["id"].startswith("flowers-")
    out = daemon.outbox / job["id"]
    status = daemon.status(job["id"])
    assert status["state"] == "succeeded" and status["progress"] == "3/3" and status["dataset"] == "flowers"
    assert status["metrics"]["val_accuracy"] == pytest.approx(0.43)
    assert status["best_val_accuracy"] == pytest.approx(0.43)
    assert (out / "model.keras").exists() and "attempt 1" in (out / "train.log").read_text()
    assert not (daemon.inbox / "flowers").exists()
    archived = daemon.archive / job["id"]
    assert (archived / "job.yaml").exists() and len(list((archived / "circle").iterdir())) == 2
    assert status["dataset_path"] == str(archived)
    assert not (daemon.state / "jobs" / job["id"]).exists()  # checkpoints cleaned up after success

    samples = daemon.scrape()
    assert value(samples, "dropfit_jobs_total", kind="train", outcome="succeeded") == 1
    for outcome in ("failed", "cancelled", "rejected"):
        assert value(samples, "dropfit_jobs_total", kind="train", outcome=outcome) == 0  # pre-initialised
    labels = {"job_id": job["id"], "dataset": "flowers"}
    assert value(samples, "dropfit_job_epoch", **labels) == 3
    assert value(samples, "dropfit_job_epochs_planned", **labels) == 3
    assert value(samples, "dropfit_job_epochs_total", **labels) == 3
    assert value(samples, "dropfit_job_accuracy", **labels, split="validation") == pytest.approx(0.43)
    assert value(samples, "dropfit_job_loss", **labels, split="train") == pytest.approx(1 / 3)
    assert value(samples, "dropfit_job_images_per_second", **labels) == 200
    assert value(samples, "dropfit_epoch_duration_seconds_count") == 3
    assert value(samples, "dropfit_job_duration_seconds_count") == 1
    assert value(samples, "dropfit_last_success_timestamp_seconds") > time.time() - 60
    assert value(samples, "dropfit_invalid_images_total") == 2
    assert value(samples, "dropfit_jobs_queued") == 0 and value(samples, "dropfit_jobs_running") == 0
    assert value(samples, "dropfit_inbox_pending") == 0
    code, body = daemon.get("/healthz")
    assert code == 200 and json.loads(body)["status"] == "ok"
    assert f"[{job['id']}]" in daemon.log()  # job log lines carry the job id
    assert daemon.stop() == 0


def test_per_job_series_expire_after_the_retention_time(tmp_path):
    daemon = DaemonProcess(tmp_path / "d", metrics_retention_seconds=1).start()
    try:
        daemon.drop("short", {"epochs": 1})
        daemon.wait_jobs(1)
        wait_for(lambda: not any(k[0] == "dropfit_job_epoch" for k in daemon.scrape()), 10, what="series removal")
        assert value(daemon.scrape(), "dropfit_jobs_total", kind="train", outcome="succeeded") == 1
    finally:
        daemon.stop()


def test_a_folder_still_being_copied_is_not_started_until_it_settles(tmp_path):
    settle = 1.5
    daemon = DaemonProcess(tmp_path / "d", settle_seconds=settle).start()
    try:
        folder = daemon.inbox / "slowcopy"
        (folder / "a").mkdir(parents=True)
        (folder / "job.yaml").write_text("epochs: 1\n")  # the spec arrives first...
        src = next((ROOT / "tests").glob("*.py"))
        last_write = 0.0
        for i in range(5):  # ...and files keep coming deep inside, 0.5 s apart (well under settle_seconds)
            time.sleep(0.5)  # the copy's pace, on purpose (not a wait for a condition)
            (folder / "a" / f"f{i}.png").write_bytes(src.read_bytes())
            last_write = time.time()
            # Not claimed: still in the inbox, nothing in the state folder (looked at without a `dropfit status`,
            # whose start-up would stretch the pace).
            assert folder.is_dir() and not list((daemon.state / "jobs").glob("*")), "claimed while still arriving"
        [job] = daemon.wait_jobs(1)
        run = daemon.runs(job["id"])[0]
        assert run["time"] >= last_write + settle
        assert len(list((daemon.archive / job["id"] / "a").iterdir())) == 5
    finally:
        daemon.stop()


def test_invalid_spec_fails_with_the_exact_error_and_keeps_the_dataset(daemon):
    daemon.start()
    daemon.drop("broken", {"epochs": 0, "batch_sise": 4})
    [job] = daemon.wait_jobs(1)
    assert job["state"] == "failed" and job["outcome"] == "rejected" and job["error_kind"] == "spec"
    status = daemon.status(job["id"])
    assert "broken/job.yaml:2: batch_sise: unknown key (did you mean 'batch_size'?)" in status["error"]
    assert "epochs: must be a positive integer, got 0" in status["error"]
    error_txt = (daemon.outbox / job["id"] / "error.txt").read_text()
    assert "epochs: must be a positive integer, got 0" in error_txt and status["dataset_path"] in error_txt
    kept = Path(status["dataset_path"])
    assert (kept / "job.yaml").exists() and len(list((kept / "circle").iterdir())) == 2
    assert value(daemon.scrape(), "dropfit_jobs_total", kind="train", outcome="rejected") == 1
    assert value(daemon.scrape(), "dropfit_jobs_total", kind="train", outcome="failed") == 0


def test_the_same_folder_name_dropped_twice_gives_two_jobs(daemon):
    daemon.start()
    daemon.drop("twice", {"epochs": 1})
    daemon.wait_jobs(1)
    daemon.drop("twice", {"epochs": 2})
    jobs = daemon.wait_jobs(2)
    assert [j["state"] for j in jobs] == ["succeeded", "succeeded"]
    assert jobs[0]["id"] != jobs[1]["id"] and [j["epochs"] for j in jobs] == [1, 2]
    assert all(len(daemon.runs(j["id"])) == 1 for j in jobs)


def test_twenty_datasets_dropped_at_once_all_run_once_in_fifo_order(daemon):
    daemon.start()
    names = [f"batch{i:02d}" for i in range(20)]
    for name in names:
        daemon.drop(name, {"epochs": 1}, per_class=1)
    jobs = daemon.wait_jobs(20, timeout=120)
    assert len(jobs) == 20 and all(j["state"] == "succeeded" for j in jobs)
    assert [j["name"] for j in jobs] == names  # claimed in the order they were dropped
    runs = [daemon.runs(j["id"]) for j in jobs]
    assert all(len(r) == 1 for r in runs)  # none lost, none run twice
    starts = [r[0]["time"] for r in runs]
    assert starts == sorted(starts)  # and run first-in, first-out
    assert value(daemon.scrape(), "dropfit_jobs_total", kind="train", outcome="succeeded") == 20
    assert sorted(os.listdir(daemon.inbox)) == []


def test_a_crashed_trainer_is_retried_and_resumes_from_its_checkpoint(daemon):
    daemon.start()
    daemon.drop("flaky", {"epochs": 4}, fake={"crash_epoch": 3, "crash_attempts": 1})
    [job] = daemon.wait_jobs(1)
    assert job["state"] == "succeeded" and job["attempt"] == 2
    runs = daemon.runs(job["id"])
    assert [r["resumed_from"] for r in runs] == [0, 2]
    assert "retrying from the last checkpoint" in daemon.log()


def test_a_trainer_that_keeps_dying_fails_with_a_readable_reason(tmp_path):
    daemon = DaemonProcess(tmp_path / "d", retries=1).start()
    try:
        daemon.drop("oom", {"epochs": 3}, fake={"crash_epoch": 2, "crash_signal": "SIGKILL"})
        daemon.drop("bug", {"epochs": 3}, fake={"crash_epoch": 1, "exit_code": 1})
        oom, bug = daemon.wait_jobs(2)
        assert oom["state"] == "failed" and oom["attempt"] == 2
        assert "killed by SIGKILL (out of memory?" in oom["error"]
        assert bug["state"] == "failed" and "exited with code 1: simulated failure" in bug["error"]
        assert Path(oom["path"]).is_dir()  # the dataset stays with the failed job
        assert value(daemon.scrape(), "dropfit_jobs_total", kind="train", outcome="failed") == 2
    finally:
        daemon.stop()


def test_a_hanging_trainer_is_stopped_at_the_timeout(tmp_path):
    daemon = DaemonProcess(tmp_path / "d", job_timeout_seconds=2, stop_grace_seconds=1).start()
    try:
        daemon.drop("stuck", {"epochs": 3}, fake={"hang": True})
        daemon.drop("deaf", {"epochs": 3}, fake={"hang": True, "ignore_sigterm": True})
        stuck, deaf = daemon.wait_jobs(2)
        for job in (stuck, deaf):
            assert job["state"] == "failed" and job["error_kind"] == "timeout"
            assert "timed out after 2 seconds" in job["error"]
            assert job["finished_at"] - job["started_at"] < 15
        assert "the trainer exited with code 75" in stuck["error"]  # it checkpointed on SIGTERM
        # The other ignored SIGTERM: killed once the grace period was over.
        assert "killed by SIGKILL" in deaf["error"]
        assert f"[{deaf['id']}] daemon.service: the trainer did not stop within 1 s; killing it" in daemon.log()
    finally:
        daemon.stop()


def test_cancel_a_running_job_with_a_file_and_a_queued_one_with_the_command(daemon):
    daemon.start()
    daemon.drop("long", {"epochs": 100}, fake={"sleep": 0.2})
    daemon.drop("waiting", {"epochs": 1})
    jobs = wait_for(lambda: (j := daemon.jobs()) and len(j) == 2 and j[0]["state"] == "running" and j[1]["state"]
                    == "queued" and j, 30, what="one running, one queued")
    long_id, waiting_id = jobs[0]["id"], jobs[1]["id"]
    cancel = subprocess.run([sys.executable, "-m", "daemon", "cancel", waiting_id, "--config",
                             str(daemon.root / "config.yaml")], capture_output=True, text=True,
                            env=env_for_subprocess(), cwd=ROOT)
    assert cancel.returncode == 0 and "cancel requested" in cancel.stdout
    wait_for(lambda: daemon.jobs()[1]["state"] == "cancelled", 10, what="queued job cancelled")
    assert daemon.runs(waiting_id) == []  # never ran
    (daemon.outbox / long_id / "CANCEL").write_text("")
    jobs = daemon.wait_jobs(2)
    assert [j["state"] for j in jobs] == ["cancelled", "cancelled"]
    assert jobs[0]["epoch"] < 100
    assert value(daemon.scrape(), "dropfit_jobs_total", kind="train", outcome="cancelled") == 2
    again = subprocess.run([sys.executable, "-m", "daemon", "cancel", waiting_id, "--config",
                            str(daemon.root / "config.yaml")], capture_output=True, text=True,
                           env=env_for_subprocess(), cwd=ROOT)
    assert again.returncode == 1 and "already ended: cancelled" in again.stderr


def test_sigterm_interrupts_running_jobs_and_the_next_start_resumes_them(daemon):
    daemon.start()
    daemon.drop("resumable", {"epochs": 30}, fake={"sleep": 0.1})
    wait_for(lambda: (j := daemon.jobs()) and j[0]["epoch"] >= 3, 30, what="epoch 3")
    assert daemon.stop(signal.SIGTERM, timeout=30) == 0
    [job] = daemon.jobs()
    assert job["state"] == "interrupted"
    stopped_at = job["epoch"]
    assert "SIGTERM: no new jobs" in daemon.log()
    daemon.start()
    [job] = daemon.wait_jobs(1)
    assert job["state"] == "succeeded" and job["epoch"] == 30 and job["attempt"] == 2
    runs = daemon.runs(job["id"])
    assert len(runs) == 2 and runs[1]["resumed_from"] == stopped_at


def test_a_second_signal_kills_trainers_that_ignore_the_first(tmp_path):
    daemon = DaemonProcess(tmp_path / "d", stop_grace_seconds=60).start()
    daemon.drop("deaf", {"epochs": 3}, fake={"hang": True, "ignore_sigterm": True})
    job = wait_for(lambda: (j := daemon.jobs()) and j[0]["state"] == "running" and j[0], 30, what="running")
    daemon.proc.send_signal(signal.SIGTERM)
    # The signal was taken in and the trainer asked to stop (the log says so), and it is still held (healthz:
    # stopping, one running): the daemon waits for it to checkpoint (it never will) instead of exiting. A daemon
    # that had exited would refuse the request.
    wait_for(lambda: "SIGTERM: no new jobs; asking 1 trainer(s) to checkpoint and stop" in daemon.log()
             and (r := daemon.get("/healthz"))[0] == 503 and json.loads(r[1])["running"] == 1, 10,
             what="the trainer asked to stop, and still held", show=daemon.describe)
    assert daemon.proc.poll() is None
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0 and time.monotonic() - started < 10  # not the 60 s grace
    assert "second SIGTERM: killing 1 trainer(s) now" in daemon.log()
    status = Path(f"/proc/{job['pid']}/status")
    wait_for(lambda: not status.exists() or "zombie" in status.read_text(), 10, what="the trainer to be gone")
    [job] = daemon.jobs()
    assert job["state"] == "interrupted"  # and it resumes on the next start


def test_kill_9_of_the_daemon_loses_nothing_and_keeps_the_queue_order(daemon):
    daemon.start()
    for name in ("first", "second", "third"):
        daemon.drop(name, {"epochs": 20}, fake={"sleep": 0.1})
    wait_for(lambda: (j := daemon.jobs()) and len(j) == 3 and j[0]["epoch"] >= 2, 30, what="first job running")
    orphan = daemon.jobs()[0]["pid"]
    daemon.kill9()
    daemon.drop("while-down", {"epochs": 1})  # arrives while no daemon runs
    daemon.start()
    jobs = daemon.wait_jobs(4, timeout=120)
    assert [j["name"] for j in jobs] == ["first", "second", "third", "while-down"]
    assert all(j["state"] == "succeeded" for j in jobs)
    first_runs = daemon.runs(jobs[0]["id"])
    assert len(first_runs) == 2 and first_runs[1]["resumed_from"] >= 2
    assert all(len(daemon.runs(j["id"])) == 1 for j in jobs[1:])
    starts = [daemon.runs(j["id"])[0]["time"] for j in jobs[1:]]
    assert starts == sorted(starts)
    with pytest.raises(ProcessLookupError):
        os.kill(orphan, 0)  # the old daemon's trainer did not keep running beside the new one


def test_one_job_per_gpu(tmp_path):
    daemon = DaemonProcess(tmp_path / "d", gpus=["0", "1"]).start()
    try:
        daemon.drop("g1", {"epochs": 10}, fake={"sleep": 0.1})
        daemon.drop("g2", {"epochs": 10}, fake={"sleep": 0.1})
        daemon.drop("g3", {"epochs": 1})
        wait_for(lambda: (j := daemon.jobs()) and len(j) == 3 and [x["state"] for x in j] ==
                 ["running", "running", "queued"], 30, what="two running on two GPUs")
        jobs = daemon.wait_jobs(3)
        cuda = [daemon.runs(j["id"])[0]["cuda"] for j in jobs]
        assert sorted(cuda[:2]) == ["0", "1"] and cuda[2] in ("0", "1")
    finally:
        daemon.stop()


def test_a_multi_gpu_job_waits_for_every_gpu_and_gets_them_all(tmp_path):
    daemon = DaemonProcess(tmp_path / "d", gpus=["0", "1"]).start()
    try:
        daemon.drop("single", {"epochs": 30}, fake={"sleep": 0.1})
        daemon.drop("all", {"epochs": 2, "hardware": {"multi_gpu": True}})
        daemon.drop("after", {"epochs": 1})
        # FIFO: nobody jumps ahead onto the free GPU. The gauges are set after each pass of the loop, whose
        # scheduling runs after its intake: one running and two queued there means the scheduler has looked at
        # both waiting jobs with a GPU free, and left them waiting.
        wait_for(lambda: (s := daemon.scrape())[("dropfit_jobs_running", ())] == 1
                 and s[("dropfit_jobs_queued", ())] == 2, 30, what="one running, two queued", show=daemon.describe)
        assert [j["state"] for j in daemon.jobs()] == ["running", "queued", "queued"]
        jobs = daemon.wait_jobs(3)
        cuda = [daemon.runs(j["id"])[0]["cuda"] for j in jobs]
        assert cuda[1] in ("0,1", "1,0")
        assert daemon.runs(jobs[1]["id"])[0]["time"] > daemon.runs(jobs[0]["id"])[0]["time"] + 0.5
    finally:
        daemon.stop()


def test_lines_that_are_not_events_are_logged_and_ignored(daemon):
    daemon.start()
    daemon.drop("noisy", {"epochs": 2}, fake={"garbage": True})
    [job] = daemon.wait_jobs(1)
    assert job["state"] == "succeeded"
    assert "not an event: this is not json" in daemon.log()


def test_demo_command_drops_a_job_into_the_running_daemon(daemon):
    daemon.start()
    proc = subprocess.run([sys.executable, "-m", "daemon", "demo", "--name", "demo1", "--config",
                           str(daemon.root / "config.yaml")], capture_output=True, text=True,
                          env=env_for_subprocess(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    [job] = daemon.wait_jobs(1)
    assert job["name"] == "demo1" and job["state"] == "succeeded"
    table = subprocess.run([sys.executable, "-m", "daemon", "status", "--config", str(daemon.root / "config.yaml")],
                           capture_output=True, text=True, env=env_for_subprocess(), cwd=ROOT, check=True).stdout
    assert job["id"] in table and "succeeded" in table and "30/30" in table


def test_an_invalid_config_is_refused_with_a_located_error(tmp_path):
    (tmp_path / "config.yaml").write_text("settle_second: 3\nmetrics: {port: 99999}\n")
    proc = subprocess.run([sys.executable, "-m", "daemon", "serve", "--config", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, env=env_for_subprocess(), cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "config.yaml:1: settle_second: unknown key (did you mean 'settle_seconds'?)" in proc.stderr
    assert "config.yaml:2: metrics.port: must be <= 65535, got 99999" in proc.stderr


def test_the_daemon_never_imports_tensorflow(tmp_path):
    code = f"""
import sys, threading, time, json
sys.path.insert(0, {str(ROOT / 'tests')!r})
from daemon.config import load_config
from daemon.service import Daemon
from daemon_harness import DaemonProcess
import daemon.cli, daemon.watch, daemon.metrics, daemon.runners.local, daemon.intake, daemon.ledger, daemon.outbox
h = DaemonProcess(__import__('pathlib').Path({str(tmp_path / 'd')!r}))
d = Daemon(load_config(h.root / 'config.yaml'))
t = threading.Thread(target=d.run, kwargs={{'install_signals': False}}); t.start()
d.ready.wait(30)
h.drop('x', {{'epochs': 1}})
while not (h.outbox.exists() and any((p / 'model.keras').exists() for p in h.outbox.iterdir())):
    time.sleep(0.05)
d.request_stop(); t.join(30)
print(json.dumps(sorted(m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=env_for_subprocess(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_unusable_folders_stop_the_start_with_a_clear_message(tmp_path):
    (tmp_path / "config.yaml").write_text("metrics: {port: 0}\noutbox: /proc/dropfit-outbox\n")
    proc = subprocess.run([sys.executable, "-m", "daemon", "serve", "--config", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, env=env_for_subprocess(), cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "cannot start: outbox: cannot create /proc/dropfit-outbox" in proc.stderr
    assert "Traceback" not in proc.stderr
