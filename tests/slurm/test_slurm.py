"""The Slurm runner against a real one-node Slurm cluster on localhost (munged, slurmctld, slurmd from Debian's
packages, started from a temporary folder: tests/slurm_cluster.py), with real daemons, real sbatch/squeue/scancel.

Most jobs use the stand-in trainer (the same protocol module; it follows --events-file like the real one); one runs
the real trainer. The cluster's node has 2 CPUs and 2 GPUs faked as GRES device files (mknod).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, wait_for
from slurm_cluster import REQUIRED_BINARIES, SlurmCluster


@pytest.fixture(scope="module")
def cluster():
    import os
    import shutil

    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)}; Debian: apt-get install slurmctld slurmd "
                    "slurm-client munge; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to launch jobs (CI runs as root)")
    c = SlurmCluster(cpus=2, gpus=2).start()
    yield c
    c.stop()


def slurm_daemon(tmp_path, cluster, **config) -> DaemonProcess:
    slurm = {"cpus_per_job": 1, **config.pop("slurm", {})}
    return DaemonProcess(tmp_path / "d", env={"SLURM_CONF": str(cluster.conf)}, max_concurrent_jobs=10,
                         runner={"kind": "slurm", "poll_interval": 0.3, "slurm": slurm}, **config)


def slurm_jobs(cluster, dropfit_id: str) -> list[dict]:
    """Every Slurm job this cluster still knows for one dropfit job (by its job name)."""
    out = cluster.run("squeue", "--noheader", "--states=all", "--format=%i|%j|%T").stdout
    return [{"id": i, "state": s} for i, n, s in (line.split("|") for line in out.split())
            if n.startswith(f"dropfit-{dropfit_id[:40]}")]


def job_at_restart(log: str, job_id: str) -> int:
    """The epoch the ledger had for ``job_id`` when the second daemon re-attached (from its log line)."""
    import re

    return int(re.search(rf"\[{re.escape(job_id)}\] daemon.recovery: re-attached .* events from epoch (\d+)", log)
               .group(1))


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_a_drop_goes_through_sbatch_to_a_finished_job_with_metrics(tmp_path, cluster):
    d = slurm_daemon(tmp_path, cluster).start()
    try:
        assert "slurm runner: sbatch to the default partition" in d.log()
        d.drop("on-slurm", {"epochs": 3}, fake={"sleep": 0.2})
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["epoch"] == 3 and job["engine"] == "slurm", job
        [sjob] = slurm_jobs(cluster, job["id"])
        assert sjob["id"] == job["engine_ref"] and sjob["state"] == "COMPLETED"
        script = (d.state / "jobs").glob(f"{job['id']}/slurm/attempt-1.sh")
        assert not list(script)  # the state folder is freed after success (the script went with it)
        log = (d.outbox / job["id"] / "train.log").read_text()
        assert f"slurm job {job['engine_ref']} on" in log and '"event"' not in log  # events went to their file
        samples = d.scrape()
        labels = {"job_id": job["id"], "dataset": "on-slurm"}
        assert value(samples, "dropfit_job_epoch", **labels) == 3
        assert value(samples, "dropfit_job_epochs_total", **labels) == 3
        assert value(samples, "dropfit_jobs_total", kind="train", outcome="succeeded") == 1
        assert value(samples, "dropfit_submit_errors_total", engine="slurm") == 0
    finally:
        d.stop()


def test_three_drops_on_a_node_that_fits_two_the_third_waits_in_slurm_in_order(tmp_path, cluster):
    d = slurm_daemon(tmp_path, cluster).start()
    try:
        for name in ("first", "second", "third"):
            d.drop(name, {"epochs": 30}, fake={"sleep": 0.1})
        jobs = wait_for(lambda: (j := d.jobs()) and len(j) == 3 and all(x["engine_ref"] for x in j) and
                        [x["engine_state"] for x in j] == ["running", "running", "pending"] and j, 30,
                        what="two running, one pending in Slurm")
        table = d.cli("status").stdout
        assert "pending in slurm" in table and f"slurm job {jobs[2]['engine_ref']}" in table
        samples = d.scrape()
        assert value(samples, "dropfit_jobs_pending_in_engine") == 1 and value(samples, "dropfit_jobs_running") == 2
        refs = [int(j["engine_ref"]) for j in jobs]
        assert refs == sorted(refs)  # submitted first in, first out
        done = d.wait_jobs(3, timeout=120)
        assert [j["state"] for j in done] == ["succeeded"] * 3
        assert done[2]["started_at"] >= done[1]["started_at"]
        starts = [d.runs(j["id"])[0]["time"] for j in done]
        assert starts[2] > min(starts[:2]) + 1.0  # the third ran only once a CPU was free
    finally:
        d.stop()


def test_cancel_a_running_and_a_pending_job_with_scancel(tmp_path, cluster):
    d = slurm_daemon(tmp_path, cluster, slurm={"cpus_per_job": 2}).start()
    try:
        d.drop("long", {"epochs": 300}, fake={"sleep": 0.1})
        d.drop("waiting", {"epochs": 1})
        running, waiting = wait_for(lambda: (j := d.jobs()) and len(j) == 2 and j[0]["epoch"] >= 1 and
                                    j[1]["engine_state"] == "pending" and j, 30, what="one running, one pending")
        for job in (waiting, running):
            assert d.cli("cancel", job["id"]).returncode == 0
        jobs = d.wait_jobs(2, timeout=60)
        assert [j["state"] for j in jobs] == ["cancelled", "cancelled"]
        assert jobs[0]["epoch"] < 300
        assert "stopped on request" in (d.outbox / running["id"] / "train.log").read_text()  # it checkpointed
        states = {j["id"]: j["state"] for j in slurm_jobs(cluster, running["id"]) + slurm_jobs(cluster, waiting["id"])}
        assert set(states.values()) <= {"CANCELLED", "FAILED"}  # the pending one never ran
        assert d.runs(waiting["id"]) == []
    finally:
        d.stop()


def test_a_job_past_its_timeout_fails_as_timeout(tmp_path, cluster):
    d = slurm_daemon(tmp_path, cluster, job_timeout_seconds=3, stop_grace_seconds=2).start()
    try:
        d.drop("stuck", {"epochs": 3}, fake={"hang": True})
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "failed" and job["error_kind"] == "timeout", job
        assert "timed out after 3 seconds" in job["error"]
        script = (d.state / "jobs" / job["id"] / "slurm" / "attempt-1.sh").read_text()
        assert "exec " in script
        info = cluster.job_info(job["engine_ref"])
        assert info["TimeLimit"] == "00:02:00"  # Slurm's own limit is the backstop, a little later
    finally:
        d.stop()


def test_a_crashed_trainer_is_submitted_again_and_resumes(tmp_path, cluster):
    d = slurm_daemon(tmp_path, cluster).start()
    try:
        d.drop("flaky", {"epochs": 5}, fake={"crash_epoch": 3, "crash_attempts": 1, "sleep": 0.1})
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["attempt"] == 2 and job["epoch"] == 5, job
        assert [r["resumed_from"] for r in d.runs(job["id"])] == [0, 2]
        first, second = sorted(slurm_jobs(cluster, job["id"]), key=lambda j: int(j["id"]))
        assert first["state"] == "FAILED" and second["state"] == "COMPLETED"
        assert "killed by SIGKILL" in d.log()
    finally:
        d.stop()


def test_kill_9_of_the_daemon_re_attaches_without_a_second_sbatch(tmp_path, cluster):
    d = slurm_daemon(tmp_path, cluster).start()
    try:
        d.drop("survivor", {"epochs": 40}, fake={"sleep": 0.1})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 3 and j[0], 30, what="epoch 3")
        d.kill9()
        time.sleep(1.0)  # the job goes on in Slurm meanwhile
        d.start()
        assert f"re-attached to slurm {job['engine_ref']}" in d.log()
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["epoch"] == 40 and job["attempt"] == 1
        assert len(slurm_jobs(cluster, job["id"])) == 1 and len(d.runs(job["id"])) == 1  # one sbatch, one run
        # Epochs are neither lost nor counted twice: this daemon counted exactly those it had not yet applied.
        log = d.log()
        counted = value(d.scrape(), "dropfit_job_epochs_total", job_id=job["id"], dataset="survivor")
        assert counted is not None and counted == 40 - job_at_restart(log, job["id"])
    finally:
        d.stop(signal.SIGKILL)


def test_two_jobs_get_different_gpus_and_a_third_waits(tmp_path, cluster):
    if not cluster.gpu_env_works:
        pytest.skip("mknod is not allowed here: Slurm schedules the fake GPUs but sets no CUDA_VISIBLE_DEVICES")
    d = slurm_daemon(tmp_path, cluster, slurm={"gpus_per_job": 1}).start()
    try:
        for name in ("g1", "g2", "g3"):
            d.drop(name, {"epochs": 10}, fake={"sleep": 0.1})
        wait_for(lambda: (j := d.jobs()) and len(j) == 3 and [x["engine_state"] for x in j] ==
                 ["running", "running", "pending"], 30, what="two on GPUs, one waiting")
        jobs = d.wait_jobs(3, timeout=120)
        cuda = [d.runs(j["id"])[0]["cuda"] for j in jobs]
        assert sorted(cuda[:2]) == ["0", "1"] and cuda[2] in ("0", "1")
        assert cluster.job_info(jobs[0]["engine_ref"])["TresPerNode"] == "gres:gpu:1"  # asked of Slurm, per job
    finally:
        d.stop()


def test_the_real_trainer_through_slurm(tmp_path, cluster):
    d = slurm_daemon(tmp_path, cluster, trainer_command=None, slurm={"cpus_per_job": 2}).start()
    try:
        d.drop("real", {"target_size": 16, "epochs": 2, "batch_size": 8, "model": {"architecture": "recipe"}},
               per_class=6, size_range=(16, 24))
        [job] = d.wait_jobs(1, timeout=300)
        assert job["state"] == "succeeded" and job["epoch"] == 2, (job, d.log()[-2000:])
        out = d.outbox / job["id"]
        assert (out / "model.keras").is_file() and (out / "report.html").is_file()
        assert json.loads((out / "summary.json").read_text())["epochs_trained"] == 2
    finally:
        d.stop()


def sbatch_that_kills_its_caller(tmp_path, cluster) -> tuple[Path, Path]:
    """A bin_dir whose ``sbatch`` is the real one, after which it kills the process that called it (the daemon) with
    SIGKILL once — a crash right between Slurm taking the job and the ledger recording its id. The other commands
    are the real ones."""
    bin_dir, armed = tmp_path / "bin", tmp_path / "kill-after-sbatch"
    bin_dir.mkdir()
    for name in ("squeue", "scontrol", "scancel"):
        (bin_dir / name).symlink_to(shutil.which(name))
    (bin_dir / "sbatch").write_text(f"""#!/bin/bash
out=$({shutil.which("sbatch")} "$@"); rc=$?
echo "$out"
if [ $rc -eq 0 ] && rm {armed} 2> /dev/null; then kill -9 $PPID; fi
exit $rc
""")
    (bin_dir / "sbatch").chmod(0o755)
    armed.touch()
    return bin_dir, armed


def test_a_daemon_killed_right_after_sbatch_finds_the_job_by_name_and_never_submits_twice(tmp_path, cluster):
    bin_dir, armed = sbatch_that_kills_its_caller(tmp_path, cluster)
    d = slurm_daemon(tmp_path, cluster, slurm={"bin_dir": str(bin_dir)}).start()
    try:
        d.drop("once", {"epochs": 20}, fake={"sleep": 0.1})
        wait_for(lambda: d.proc.poll() is not None, 30, what="the daemon killed right after sbatch")
        assert not armed.exists()
        [job] = d.jobs()  # the ledger holds the attempt as handed over, without Slurm's id
        assert job["state"] == "running" and job["engine_state"] == "submitted" and job["engine_ref"] is None, job
        [sjob] = wait_for(lambda: slurm_jobs(cluster, job["id"]) or None, 10, what="the job in Slurm")
        d.start()
        [job] = d.wait_jobs(1, timeout=90)
        assert job["state"] == "succeeded" and job["attempt"] == 1 and job["engine_ref"] == sjob["id"], job
        assert [j["id"] for j in slurm_jobs(cluster, job["id"])] == [sjob["id"]]  # one sbatch
        assert len(d.runs(job["id"])) == 1 and f"found attempt 1 of {job['id']} in slurm as {sjob['id']}" in d.log()
    finally:
        d.stop()


def occupy_the_node(cluster, seconds: float) -> str:
    """A job outside dropfit that takes both CPUs of the node for ``seconds``."""
    return cluster.sbatch("-o", "/dev/null", "-J", "blocker", "-c", "2", "--wrap", f"sleep {seconds}")


def test_time_waiting_in_slurm_is_not_counted_against_the_timeout(tmp_path, cluster):
    blocker = occupy_the_node(cluster, 8)
    wait_for(lambda: cluster.job_state(blocker) == "RUNNING", 20, what="the node busy")
    d = slurm_daemon(tmp_path, cluster, job_timeout_seconds=4, stop_grace_seconds=2).start()
    try:
        d.drop("patient", {"epochs": 5}, fake={"sleep": 0.2})
        wait_for(lambda: (j := d.jobs()) and j[0]["engine_state"] == "pending", 20, what="pending in Slurm")
        [job] = d.wait_jobs(1, timeout=90)
        assert job["state"] == "succeeded", job  # ~8 s waiting for the node, ~1 s running: within 4 s of running
        ran = d.runs(job["id"])[0]["time"]
        assert ran - job["started_at"] > 4, "it did not wait longer than the timeout: the test proves nothing"
        assert job["running_since"] == pytest.approx(ran, abs=2.0)  # Slurm's StartTime (whole seconds)
    finally:
        d.stop()
        cluster.run("scancel", blocker, check=False)


def test_a_re_attached_job_keeps_its_timeout_clock(tmp_path, cluster):
    timeout = 8
    d = slurm_daemon(tmp_path, cluster, job_timeout_seconds=timeout, stop_grace_seconds=2).start()
    try:
        d.drop("stuck", {"epochs": 3}, fake={"hang": True})
        wait_for(lambda: (j := d.jobs()) and j[0]["engine_state"] == "running" and d.runs(j[0]["id"]), 30,
                 what="running in Slurm")
        time.sleep(3)  # (a wait for time to pass, not for a condition): part of the timeout is used
        d.kill9()
        time.sleep(3)  # (likewise on purpose): the job runs on in Slurm while no daemon watches it
        d.start()
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "failed" and job["error_kind"] == "timeout", job
        ran = d.runs(job["id"])[0]["time"]
        # Stopped at the timeout counted from when Slurm started it, not from the re-attach (which would be ~6 s on).
        assert timeout - 1.5 <= job["finished_at"] - ran <= timeout + 2 + 2.5, (job["finished_at"] - ran)
    finally:
        d.stop()


def test_the_controller_down_at_submit_and_while_running_loses_nothing(tmp_path, cluster):
    d = slurm_daemon(tmp_path, cluster).start()
    try:
        cluster.stop_controller()
        try:
            d.drop("first", {"epochs": 4}, fake={"sleep": 0.1})
            wait_for(lambda: (value(d.scrape(), "dropfit_submit_errors_total", engine="slurm") or 0) >= 1, 60,
                     what="a refused submission")
            [job] = d.jobs()
            assert job["state"] == "queued" and "not submitted to slurm" in job["error"], job
        finally:
            cluster.start_controller()
        [job] = d.wait_jobs(1, timeout=90)
        assert job["state"] == "succeeded" and job["attempt"] == 1 and job["epoch"] == 4, job

        d.drop("second", {"epochs": 40}, fake={"sleep": 0.1})
        second = wait_for(lambda: (j := d.jobs()) and len(j) == 2 and j[1]["epoch"] >= 2 and j[1], 60,
                          what="the second job running")
        cluster.stop_controller()
        try:
            # The trainer goes on on the node, and its epochs still reach the daemon through the events file.
            wait_for(lambda: d.jobs()[1]["epoch"] >= second["epoch"] + 5, 30, what="epochs with Slurm down")
            assert d.jobs()[1]["state"] == "running"
        finally:
            cluster.start_controller()
        jobs = d.wait_jobs(2, timeout=120)
        assert jobs[1]["state"] == "succeeded" and jobs[1]["attempt"] == 1 and jobs[1]["epoch"] == 40, jobs[1]
        assert len(slurm_jobs(cluster, jobs[1]["id"])) == 1 and len(d.runs(jobs[1]["id"])) == 1
        assert "cannot ask slurm how its jobs are doing" in d.log() and "slurm answers again" in d.log()
    finally:
        d.stop()


def test_requeue_and_a_node_failure_resume_from_the_checkpoint(tmp_path, cluster):
    d = slurm_daemon(tmp_path, cluster, slurm={"requeue": True}).start()
    try:
        d.drop("moved", {"epochs": 40}, fake={"sleep": 0.15})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 3 and j[0], 60, what="epoch 3")
        cluster.run("scontrol", "requeue", job["engine_ref"])
        def running_again():
            runs = d.runs(job["id"])
            return len(runs) == 2 and d.jobs()[0]["epoch"] >= runs[1]["resumed_from"] + 3

        wait_for(running_again, 90, what="the requeued job running again")
        cluster.run("scontrol", "update", f"nodename={cluster.host}", "state=down", "reason=dropfit-test")
        try:
            wait_for(lambda: d.jobs()[0]["engine_state"] == "pending", 60, what="back in Slurm's queue")
        finally:  # (Slurm may have returned it to service by itself already: ReturnToService=2)
            cluster.run("scontrol", "update", f"nodename={cluster.host}", "state=resume", check=False)
        [job] = d.wait_jobs(1, timeout=120)
        assert job["state"] == "succeeded" and job["epoch"] == 40 and job["attempt"] == 1, job
        runs = d.runs(job["id"])
        assert len(runs) == 3 and [j["id"] for j in slurm_jobs(cluster, job["id"])] == [job["engine_ref"]]
        # Each run resumed where the one before had completed its last epoch: none lost, none trained twice.
        assert runs[0]["resumed_from"] == 0 and 0 < runs[1]["resumed_from"] < runs[2]["resumed_from"] < 40, runs
        assert value(d.scrape(), "dropfit_job_epochs_total", job_id=job["id"], dataset="moved") == 40
    finally:
        d.stop()
