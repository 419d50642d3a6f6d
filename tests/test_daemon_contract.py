"""Where the daemon meets the trainer and the world: the resolved spec, the protocol, one daemon per state folder,
restarts that must not touch what is not theirs. Real daemon processes, the stand-in trainer (same protocol module).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, env_for_subprocess
from contract.protocol import PROTOCOL_VERSION
from daemon_harness import DaemonProcess, tree_digest, wait_for
from trainer.data.demo import make_shapes


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProcess(tmp_path / "d")
    yield d
    d.stop(signal.SIGKILL) if d.proc and d.proc.poll() is None else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])


def _ignores(pid: int, sig: int) -> bool:
    """Whether the process has ``sig`` set to SIG_IGN (its SigIgn mask in /proc)."""
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) >> (sig - 1) & 1)


def _changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The paths of two `tree_digest`s that differ: changed, gone or new."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _ledger_set(d: DaemonProcess, job_id: str, **values) -> None:
    """Edit the ledger as an older version (or a crash) left it; only while no daemon runs."""
    db = sqlite3.connect(d.state / "ledger.sqlite3")
    with db:
        db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?", [*values.values(), job_id])
    db.close()


# --- the resolved spec is the contract -------------------------------------------------------------------------------

def test_job_defaults_reach_the_trainer_through_the_resolved_spec(tmp_path):
    d = DaemonProcess(tmp_path / "d", job_defaults={"epochs": 4, "batch_size": 8})
    try:
        d.start()
        # The trainer holds after its first epoch until released: the job is seen running, for sure, for as long
        # as the checks take (a fixed pace could end the job between two looks).
        d.drop("defaults", {}, fake={"hold_after_epoch": 1})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] == 1 and j[0], 30, what="epoch 1, held",
                       show=d.describe)
        assert job["state"] == "running" and job["epochs"] == 4  # what `dropfit status` shows: never "/50"
        assert "1/4" in d.cli("status").stdout
        status = d.status(job["id"])
        assert status["state"] == "running" and status["epochs"] == 4
        spec_file = d.state / "jobs" / job["id"] / "spec.json"
        assert json.loads(spec_file.read_text())["epochs"] == 4  # written once, at intake
        (d.outbox / job["id"] / "RELEASE").touch()
        [j] = d.wait_jobs(1)
        assert j["state"] == "succeeded" and j["epoch"] == 4 and j["epochs"] == 4
        [run] = d.runs(job["id"])
        assert run["spec"] == str(spec_file)  # the trainer was handed the resolved spec, not job.yaml
        resolved = (d.outbox / job["id"] / "job.resolved.yaml").read_text()
        data = yaml.safe_load(resolved)
        assert data["epochs"] == 4 and data["batch_size"] == 8 and data["model"]["architecture"] == "cnn"
        assert resolved.startswith("# The resolved spec")
        assert not spec_file.exists()  # the state folder is freed after success; the outbox copy stays
    finally:
        d.stop()


def test_dropfit_validate_shows_the_spec_the_daemon_would_run(tmp_path):
    d = DaemonProcess(tmp_path / "d", job_defaults={"epochs": 7, "model": {"dropout": 0.25}})
    job = tmp_path / "job"
    (job / "a").mkdir(parents=True)
    (job / "b").mkdir()
    (job / "job.yaml").write_text("batch_size: 4\n")
    proc = d.cli("validate", job)
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load(proc.stdout)
    assert spec["epochs"] == 7 and spec["batch_size"] == 4 and spec["model"]["dropout"] == 0.25
    assert spec["optimizer"]["name"] == "adam" and spec["target_size"] == "auto"  # defaults filled in
    (job / "job.yaml").write_text("batch_size: 4\nepochs: 0\n")
    proc = d.cli("validate", job / "job.yaml")
    assert proc.returncode == 2 and "job.yaml:2: epochs: must be a positive integer, got 0" in proc.stderr


# --- the protocol ----------------------------------------------------------------------------------------------------

def test_a_trainer_speaking_another_protocol_version_is_refused(daemon):
    daemon.start()
    daemon.drop("old-trainer", {"epochs": 3}, fake={"protocol": 1, "sleep": 0.2})
    [job] = daemon.wait_jobs(1)
    assert job["state"] == "failed" and job["error_kind"] == "protocol" and job["attempt"] == 1, job
    assert f"protocol version 1; this daemon speaks version {PROTOCOL_VERSION}" in job["error"]
    assert job["epoch"] == 0  # nothing it said was taken for progress


def test_invalid_data_from_the_trainer_is_rejected_not_retried(daemon):
    daemon.start()
    daemon.drop("bad-data", {"epochs": 3}, fake={"crash_epoch": 1, "exit_code": 2, "error_kind": "data"})
    [job] = daemon.wait_jobs(1)
    assert job["state"] == "failed" and job["outcome"] == "rejected" and job["error_kind"] == "data"
    assert job["attempt"] == 1 and job["error"] == "simulated failure"
    assert daemon.scrape()[("dropfit_jobs_total", (("kind", "train"), ("outcome", "rejected")))] == 1


# --- one daemon per state folder -------------------------------------------------------------------------------------

def test_a_second_daemon_on_the_same_folders_exits_at_once_and_the_first_finishes(tmp_path):
    first = DaemonProcess(tmp_path / "d").start()
    try:
        first.drop("long", {"epochs": 25}, fake={"sleep": 0.1})
        wait_for(lambda: (j := first.jobs()) and j[0]["epoch"] >= 2, 30, what="epoch 2")
        second = DaemonProcess(tmp_path / "second", inbox=str(first.inbox), outbox=str(first.outbox),
                               state_dir=str(first.state), archive_dir=str(first.archive))
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "daemon", "serve", "--config", str(second.root / "config.yaml")],
                              capture_output=True, text=True, env=env_for_subprocess(), cwd=tmp_path, timeout=30)
        assert time.monotonic() - started < 10
        assert proc.returncode == 2
        [line] = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
        assert f"state_dir {first.state} is in use by another dropfit daemon (pid {first.proc.pid} on host " \
               f"{socket.gethostname()}" in line
        assert first.cli("status").returncode == 0  # status (and cancel) work beside a running daemon
        [job] = first.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["epoch"] == 25 and job["attempt"] == 1
        assert len(first.runs(job["id"])) == 1  # trained by one trainer
    finally:
        first.stop()


def test_restart_never_signals_a_process_it_cannot_prove_is_its_trainer(daemon):
    daemon.start()
    daemon.drop("victim", {"epochs": 40}, fake={"sleep": 0.1})
    job = wait_for(lambda: (j := daemon.jobs()) and j[0]["epoch"] >= 1 and j[0], 30, what="epoch 1")
    daemon.kill9()
    wait_for(lambda: not _alive(job["pid"]), 30, what="the trainer to stop with its daemon")
    # Some other program now has a pid the ledger knows, and even the job id on its command line.
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", job["id"]],
                                start_new_session=True)
    try:
        _ledger_set(daemon, job["id"], pid=impostor.pid)
        daemon.start()
        [job] = daemon.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["epoch"] == 40
        assert impostor.poll() is None, "the restarted daemon killed a process that was not its trainer"
    finally:
        impostor.kill()
        impostor.wait()


def test_restart_stops_its_own_orphan_even_one_that_ignores_sigterm(tmp_path):
    d = DaemonProcess(tmp_path / "d", stop_grace_seconds=1)
    try:
        d.start()
        d.drop("stubborn", {"epochs": 5}, fake={"hang": True, "ignore_sigterm": True})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["state"] == "running" and j[0]["pid"] and j[0], 30,
                       what="running")
        wait_for(lambda: d.runs(job["id"]), 30, what="the trainer to be past its start-up")  # signals set up
        daemon_pid = d.proc.pid
        assert _parent(job["pid"]) == daemon_pid
        d.kill9()
        # An orphan: the kernel has reparented it, which it does in the same step as sending the parent-death
        # SIGTERM, before the daemon could be reaped; it ignores that signal, so it lives on.
        assert _alive(job["pid"]) and _parent(job["pid"]) != daemon_pid
        assert _ignores(job["pid"], signal.SIGTERM)
        d.start()
        wait_for(lambda: not _alive(job["pid"]), 20, what="the orphan to be killed")
        assert f"stopping trainer pid {job['pid']} left running by the previous daemon" in d.log()
        wait_for(lambda: d.jobs()[0]["state"] == "running", 30, what="the job to run again")
        assert d.cli("cancel", job["id"]).returncode == 0
        [job] = d.wait_jobs(1, timeout=30)
        assert job["state"] == "cancelled"
    finally:
        d.stop(signal.SIGKILL)


# --- restarts and clean-up -------------------------------------------------------------------------------------------

# What a restart itself writes, or may: its log, its lock and pid file, the ledger (and SQLite's journal files).
RESTART_WRITES = ("daemon.log", "state/daemon.json", "state/daemon.lock", "state/ledger.sqlite3",
                  "state/ledger.sqlite3-wal", "state/ledger.sqlite3-shm", "state/ledger.sqlite3-journal")


def test_a_restart_never_deletes_outside_the_jobs_state_folder(tmp_path):
    """A clean-up after success that a crash cut short is finished at the next start, and it deletes only what lies
    inside the job's own state folder, whatever the ledger says the dataset's path is: an older ledger's "" (once
    resolved against the working directory), a folder of the user's outside the daemon's folders, another job's
    kept dataset. Everything else — but those jobs' state folders, which the clean-up removes — is byte for byte as
    it was: the daemon's folders, its working directory, the user's folder."""
    d = DaemonProcess(tmp_path / "d", after_success="delete")
    try:
        d.start()
        for name in ("deleted", "pointed-out", "pointed-at-a-neighbour"):
            d.drop(name, {"epochs": 1})
        d.drop("kept-after-failure", {"epochs": 1}, fake={"crash_epoch": 1, "exit_code": 2, "error_kind": "data"})
        jobs = {j["name"]: j for j in d.wait_jobs(4)}
        failed = jobs["kept-after-failure"]
        assert failed["state"] == "failed" and Path(failed["path"]).is_dir()  # a failed job keeps its dataset
        assert all(jobs[n]["state"] == "succeeded" and jobs[n]["path"] is None
                   for n in ("deleted", "pointed-out", "pointed-at-a-neighbour"))
        d.stop()
        (d.cwd / "precious.txt").write_text("the daemon's working directory")
        users = make_shapes(tmp_path / "users-photos", classes=2, per_class=3)  # outside every configured folder
        unfinished = {}
        # A crash during each clean-up left its state folder with the policy it began with (the first, before it
        # deleted its dataset), and the ledger row says the dataset is at ``path``.
        for name, path in (("deleted", ""), ("pointed-out", str(users)), ("pointed-at-a-neighbour", failed["path"])):
            job_state = d.state / "jobs" / jobs[name]["id"]
            job_state.mkdir(parents=True)
            (job_state / ".after-success").write_text("delete\n")
            _ledger_set(d, jobs[name]["id"], path=path)
            unfinished[name] = job_state
        (unfinished["deleted"] / "dataset" / "circle").mkdir(parents=True)
        (unfinished["deleted"] / "dataset" / "circle" / "x.png").write_bytes(b"x")
        # Besides what a restart writes: the unfinished state folders, which the clean-up is to remove, and the
        # status of the job whose dataset it does delete (its dataset_path becomes null).
        skip = (*RESTART_WRITES, *(str(p.relative_to(tmp_path / "d")) for p in unfinished.values()),
                f"outbox/{jobs['deleted']['id']}/status.json")
        before = tree_digest(tmp_path / "d", skip)
        outside_before = tree_digest(users)
        assert [k for k in before if k.startswith(str(Path(failed["path"]).relative_to(tmp_path / "d")))]
        d.start()
        wait_for(lambda: not any(p.exists() for p in unfinished.values()), 10, what="the clean-ups to finish",
                 show=d.describe)
        changed = _changes(before, tree_digest(tmp_path / "d", skip))
        assert not changed, f"the restart changed or removed: {changed}"
        changed = _changes(outside_before, tree_digest(users))
        assert outside_before and not changed, f"the restart changed or removed: {changed}"
        assert f"not touching {users}" in d.log() and f"not touching {failed['path']}" in d.log()
        assert d.status(jobs["deleted"]["id"])["dataset_path"] is None
        assert d.get("/healthz")[0] == 200
    finally:
        d.stop(signal.SIGKILL)


def test_changing_after_success_never_touches_datasets_kept_on_purpose(tmp_path):
    d = DaemonProcess(tmp_path / "d", after_success="keep")
    d.start()
    d.drop("kept", {"epochs": 1})
    [job] = d.wait_jobs(1)
    d.stop()
    kept = Path(job["path"])
    assert kept.is_dir() and kept.is_relative_to(d.state / "jobs")
    # The kept job's state folder and outbox, to the byte: the new policy applies to new successes only.
    mine = (d.state / "jobs" / job["id"], d.outbox / job["id"])
    before = [tree_digest(p) for p in mine]
    assert list(kept.rglob("*.png")) and "dataset/job.yaml" in before[0]
    d.config["after_success"] = "delete"
    (d.root / "config.yaml").write_text(yaml.safe_dump(d.config))
    d.start()
    try:
        d.drop("later", {"epochs": 1})
        later = d.wait_jobs(2)[1]
        assert later["state"] == "succeeded" and later["path"] is None
        assert not (d.state / "jobs" / later["id"]).exists()  # the new policy did run, on the new success
        changed = [c for b, p in zip(before, mine, strict=True) for c in _changes(b, tree_digest(p))]
        assert not changed, f"the kept job's files changed or went: {changed}"
    finally:
        d.stop()


def test_an_interrupted_job_whose_trainer_had_finished_is_not_run_again(daemon):
    daemon.start()
    daemon.drop("nearly", {"epochs": 30}, fake={"sleep": 0.1})
    wait_for(lambda: (j := daemon.jobs()) and j[0]["epoch"] >= 2, 30, what="epoch 2")
    assert daemon.stop(signal.SIGTERM) == 0
    [job] = daemon.jobs()
    assert job["state"] == "interrupted"
    # The trainer had written its finished marker before it stopped (a second signal can come that late).
    (daemon.outbox / job["id"] / "finished.json").write_text(json.dumps({"job": job["id"], "epochs_trained": 30}))
    daemon.start()
    [job] = daemon.wait_jobs(1)
    assert job["state"] == "succeeded" and job["epoch"] == 30
    assert len(daemon.runs(job["id"])) == 1


def test_a_crash_between_the_clean_up_and_the_recorded_success_finishes_with_the_policy_it_began_with(tmp_path):
    """The dataset is put away before the ledger records the success (so nobody sees "succeeded" with a dataset that
    is about to go). A crash in between leaves the job running in the ledger with its policy written down: the
    restart records the success and keeps to that policy, whatever the config says by then."""
    d = DaemonProcess(tmp_path / "d", after_success="delete")
    d.start()
    try:
        d.drop("nearly", {"epochs": 30}, fake={"sleep": 0.1})
        wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 2, 30, what="epoch 2")
    finally:
        assert d.stop(signal.SIGTERM) == 0
    [job] = d.jobs()
    job_state = d.state / "jobs" / job["id"]
    # What a daemon running `after_success: keep` left when it died right after putting the dataset away: the
    # trainer's finished marker, the dataset where it was, the scratch and spec gone, the policy marker still there.
    (d.outbox / job["id"] / "finished.json").write_text(json.dumps({"job": job["id"], "epochs_trained": 30}))
    (job_state / "spec.json").unlink()
    shutil.rmtree(job_state / "work", ignore_errors=True)
    (job_state / ".after-success").write_text("keep\n")
    d.start()
    try:
        [job] = d.wait_jobs(1)
        assert job["state"] == "succeeded" and job["path"] == str(job_state / "dataset")
        assert list((job_state / "dataset").rglob("*.png")), "the dataset kept on purpose was deleted"
        assert not (job_state / ".after-success").exists()  # the clean-up is over: a later restart leaves it be
    finally:
        d.stop()



def test_a_status_json_left_behind_the_ledger_by_a_crash_is_rewritten_at_start(tmp_path):
    """The ledger is written first, status.json next: a kill -9 in between left "running" in status.json for a job
    the ledger had as succeeded (found by the seeded kill -9 loop). The restart brings status.json up to date."""
    d = DaemonProcess(tmp_path / "d")
    d.start()
    try:
        d.drop("done", {"epochs": 2}, fake={"sleep": 0.05})
        [job] = d.wait_jobs(1)
    finally:
        assert d.stop(signal.SIGTERM) == 0
    status = d.outbox / job["id"] / "status.json"
    stale = {**json.loads(status.read_text()), "state": "running"}
    status.write_text(json.dumps(stale))
    d.start()
    try:
        wait_for(lambda: json.loads(status.read_text())["state"] == "succeeded", 30, what="status.json rewritten")
    finally:
        d.stop()

def test_a_job_yaml_that_is_a_folder_is_rejected_not_waited_for(daemon):
    daemon.start()
    staging = daemon.root / "staging" / "odd"
    (staging / "job.yaml").mkdir(parents=True)
    (staging / "a").mkdir()
    os.rename(staging, daemon.inbox / "odd")
    [job] = daemon.wait_jobs(1, timeout=20)
    assert job["state"] == "failed" and job["outcome"] == "rejected" and job["error_kind"] == "spec"
    assert "odd/job.yaml: is a directory" in job["error"] or "odd/job.yaml: is not a regular file" in job["error"]


# --- start-up ------------------------------------------------------------------------------------------------------

def test_a_busy_port_is_one_clear_line_not_a_traceback(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d = DaemonProcess(tmp_path / "d", metrics={"port": port})
        proc = subprocess.run([sys.executable, "-m", "daemon", "serve", "--config", str(d.root / "config.yaml")],
                              capture_output=True, text=True, env=env_for_subprocess(), cwd=tmp_path, timeout=30)
    assert proc.returncode == 2
    assert f"cannot start: metrics.port: 127.0.0.1:{port} is already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def _in_process(d: DaemonProcess, cls):
    """Run a `Daemon` subclass in this process (to make one step fail on purpose); returns (daemon, thread, box)."""
    from daemon.config import load_config

    daemon = cls(load_config(d.root / "config.yaml"))
    box: dict = {}

    def run():
        try:
            box["rc"] = daemon.run(install_signals=False)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return daemon, thread, box


def test_a_failure_during_start_up_ends_the_daemon_instead_of_hanging(tmp_path):
    from daemon.service import Daemon

    class FailsToRecover(Daemon):
        def recover(self):
            raise RuntimeError("recovery exploded")

    d = DaemonProcess(tmp_path / "d")
    _, thread, box = _in_process(d, FailsToRecover)
    thread.join(10)
    assert not thread.is_alive(), "the daemon hung after a start-up failure"
    assert isinstance(box.get("error"), RuntimeError)
    assert not (d.state / "daemon.lock").read_text()  # the lock was released on the way out


def test_a_failure_recovering_one_job_fails_that_job_and_the_others_go_on(tmp_path, monkeypatch):
    from daemon.claims import Claims
    from daemon.ledger import Ledger
    from daemon.service import Daemon

    d = DaemonProcess(tmp_path / "d")
    ledger = Ledger(d.state / "ledger.sqlite3")
    for name in ("bad", "good"):  # two drops a crash left half claimed
        d.drop(name, {"epochs": 2})
        ledger.create(f"{name}-20261127T000000Z-000000", name, str(d.inbox / name),
                      str(d.state / "jobs" / f"{name}-20261127T000000Z-000000" / "dataset"))
    ledger.close()

    # Taking a claimed drop in is `daemon.claims.Claims.finish_claim`, both at start-up (recovery) and for new drops.
    real_finish_claim = Claims.finish_claim

    def finish_claim(self, job):
        if job.name == "bad":
            raise RuntimeError("this record is broken")
        real_finish_claim(self, job)

    monkeypatch.setattr(Claims, "finish_claim", finish_claim)
    daemon, thread, box = _in_process(d, Daemon)
    try:
        assert daemon.ready.wait(30), box
        # The drop it could not take stays in the inbox (nothing lost), so it is tried once more as a new job.
        bad, good, bad_again = d.wait_jobs(3)
        assert good["name"] == "good" and good["state"] == "succeeded"
        for job in (bad, bad_again):
            assert job["name"] == "bad" and job["state"] == "failed" and job["error_kind"] == "internal"
            error_txt = (d.outbox / job["id"] / "error.txt").read_text()
            assert "Traceback" in error_txt and "RuntimeError: this record is broken" in error_txt
        assert "recovering this job after a restart failed" in bad["error"]
        assert "taking this drop in failed" in bad_again["error"]
        assert (d.inbox / "bad").is_dir()
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.server.port}/healthz", timeout=10) as resp:
            assert resp.status == 200  # serving
    finally:
        daemon.request_stop()
        thread.join(30)


def test_the_metrics_server_stops_even_if_it_never_started():
    from prometheus_client import CollectorRegistry

    from daemon.metrics import MetricsServer

    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, lambda: {"status": "ok"})
    done = threading.Event()
    threading.Thread(target=lambda: (server.stop(), done.set()), daemon=True).start()
    assert done.wait(5)


def test_the_daemon_imports_only_the_trainers_contract_modules():
    """The daemon talks to the trainer through its command line, events and files: statically, it may import
    only the TensorFlow-free contract (spec, protocol, atomic writers), plus the demo and the trainer's CLI lazily."""
    import ast

    allowed = {"contract.spec", "contract.predict_spec", "contract.protocol", "contract.atomic", "contract.duration"}
    lazy_only = {"trainer.data.demo", "trainer.cli"}
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name == "trainer" or name.startswith("trainer."):
                    where = f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                    assert name in allowed | lazy_only, where
                    if name in lazy_only:
                        assert id(node) not in top_level, where + " at module level"
    code = ("import sys, daemon.cli, daemon.service, contract.spec, contract.protocol, contract.atomic; "
            "print([m for m in ('tensorflow', 'keras', 'matplotlib', 'numpy') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_for_subprocess(),
                          cwd=ROOT, check=True)
    assert proc.stdout.strip() == "[]"


def test_a_daemon_restart_does_not_use_up_a_retry(tmp_path):
    d = DaemonProcess(tmp_path / "d", retries=1)
    d.start()
    try:
        # Attempts 1 and 2 would crash at epoch 4; the daemon is killed during attempt 1, before that.
        d.drop("unlucky", {"epochs": 6}, fake={"sleep": 0.3, "crash_epoch": 4, "crash_attempts": 2})
        wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 2, 30, what="epoch 2")
        d.kill9()
        d.start()
        [job] = d.wait_jobs(1, timeout=60)
        # Attempt 2 (after the restart) crashed: its first failure, so it was retried once as configured.
        assert job["state"] == "succeeded" and job["attempt"] == 3, job
        assert [r["attempt"] for r in d.runs(job["id"])] == [1, 2, 3]
    finally:
        d.stop(signal.SIGKILL)


def test_dropfit_health_finds_a_daemon_that_picked_its_own_port(daemon):
    daemon.start()  # metrics.port: 0
    proc = daemon.cli("health")
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "ok", proc.stderr


def test_a_time_budget_and_data_warnings_show_in_status_metrics_and_the_table(tmp_path):
    d = DaemonProcess(tmp_path / "d", job_defaults={"time_budget": "15m"})
    try:
        d.start()
        d.drop("budgeted", {"epochs": 100}, fake={"sleep": 0.1, "warnings": ["12 image(s) are copies of others"]})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 2 and j[0], 30, what="epoch 2")
        status = d.status(job["id"])
        assert status["time_budget"] == 900 and 880 < status["time_left_seconds"] <= 900
        assert status["warnings"] == ["12 image(s) are copies of others"] and status["deadline_iso"]
        assert "left of 15m00s" in d.cli("status").stdout
        labels = {"job_id": job["id"], "dataset": "budgeted"}
        samples = d.scrape()
        assert samples[("dropfit_job_time_budget_seconds", tuple(sorted(labels.items())))] == 900
        left = samples[("dropfit_job_deadline_timestamp_seconds", tuple(sorted(labels.items())))] - time.time()
        assert 880 < left <= 900
        assert d.cli("cancel", job["id"]).returncode == 0
        [job] = d.wait_jobs(1)
        assert job["state"] == "cancelled" and d.status(job["id"])["time_left_seconds"] is None
    finally:
        d.stop()


def test_an_unreadable_ledger_is_one_clear_line_for_every_command_that_reads_it(tmp_path):
    d = DaemonProcess(tmp_path / "d")
    ledger = tmp_path / "d" / "state" / "ledger.sqlite3"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_bytes(b"this is not a database" * 100)
    for args in (["status"], ["models"], ["cancel", "some-job"]):
        proc = d.cli(*args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert proc.stderr.strip() == (f"error: the ledger {ledger} is unreadable (file is not a database); starting "
                                       "the daemon moves it aside and rebuilds it from the outbox"), args
