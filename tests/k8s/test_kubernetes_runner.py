"""The Kubernetes runner's contract: a real daemon with the real ``kubernetes`` client, against an in-memory API
server over real HTTP (kmock's emulator, tests/k8s/kmock_server.py). No cluster can run here, so a test "kubelet"
and Job controller (tests/k8s/fake_kubelet.py) play the cluster: they run each Job's container command (the stand-in
trainer) as a local process and report pod and Job status the way Kubernetes does, applying the Job's own
podFailurePolicy. The manifests are checked against Kubernetes' own schemas with kubernetes-validate (offline).
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace

import kmock
import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from conftest import ROOT, system_tool
from daemon_harness import DaemonProcess, wait_for
from fake_kubelet import FakeKubelet
from kmock_server import KmockThread

NS = "dropfit"
FAKE = [sys.executable, str(ROOT / "tests" / "fake_trainer.py")]
KUBERNETES_VERSION = kubernetes_validate.latest_version()  # the newest schemas it ships (1.37 here)


@pytest.fixture
def cluster(tmp_path):
    server = KmockThread().start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server.url}}],
        "users": [{"name": "anonymous", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "anonymous", "namespace": NS}}]}))
    kubelets = []

    def kubelet(**kw) -> FakeKubelet:
        kubelets.append(FakeKubelet(server.api_client(), NS, tmp_path / "pod-logs", **kw).start())
        return kubelets[-1]

    yield SimpleNamespace(server=server, kubeconfig=kubeconfig, kubelet=kubelet)
    for k in kubelets:
        k.stop()
    server.stop()
    for k in kubelets:
        k.check()


def k8s_daemon(tmp_path, cluster, kubernetes: dict | None = None, poll_interval: float = 0.2,
               **config) -> DaemonProcess:
    root = tmp_path / "d"
    k = {"namespace": NS, "kubeconfig": str(cluster.kubeconfig), "command": FAKE, "data_mount": str(root),
         "image": "registry.example/dropfit:1.0", "data_claim": "dropfit-data", **(kubernetes or {})}
    return DaemonProcess(root, max_concurrent_jobs=10, runner={"kind": "kubernetes", "poll_interval": poll_interval,
                                                              "kubernetes": k}, **config)


def batch_api(cluster) -> client.BatchV1Api:
    """What an administrator (kubectl) or Kueue does to the cluster, through the API like them."""
    return client.BatchV1Api(cluster.server.api_client())


def k8s_jobs(cluster) -> list[str]:
    return [j.metadata.name for j in batch_api(cluster).list_namespaced_job(NS).items]


def pods_of(cluster, name: str) -> list:
    core = client.CoreV1Api(cluster.server.api_client())
    return core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items


def stopped_after(log: str) -> int:
    """The epochs a trainer had completed when SIGTERM stopped it, from its "stopped on request" line."""
    return int(re.search(r"stopped on request after (\d+) epoch", log).group(1))


def requests(cluster, action, resource="batch/v1/jobs") -> list:
    handler = cluster.server.handler
    return cluster.server.call(lambda: list(handler[action, kmock.resource(resource)]))


def stored_job(cluster, name: str) -> dict:
    handler = cluster.server.handler
    return cluster.server.call(lambda: handler.objects["batch/v1/jobs", NS, name].raw)


def test_a_drop_becomes_a_batch_job_that_completes(tmp_path, cluster):
    cluster.kubelet()
    d = k8s_daemon(tmp_path, cluster, kubernetes={"queue": "team-a", "gpus_per_job": 1},
                   job_timeout_seconds=3600, stop_grace_seconds=45).start()
    try:
        d.drop("Flowers_Big", {"epochs": 3}, fake={"sleep": 0.2})
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["epoch"] == 3 and job["engine"] == "kubernetes", job
        name = job["engine_ref"]
        assert len(name) <= 63 and name == name.lower() and name.startswith("dropfit-")  # DNS-1123
        k8s_job = stored_job(cluster, name)
        spec, pod = k8s_job["spec"], k8s_job["spec"]["template"]["spec"]
        assert k8s_job["metadata"]["annotations"]["dropfit.dev/job-id"] == job["id"]
        assert k8s_job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
        assert spec["activeDeadlineSeconds"] >= 3600 and pod["terminationGracePeriodSeconds"] == 45
        rules = spec["podFailurePolicy"]["rules"]
        assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                                 "values": [2]}}
        assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
        [container] = pod["containers"]
        assert container["image"] == "registry.example/dropfit:1.0"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "dropfit-data"
        assert "--events-file" in container["args"] and "--log-file" in container["args"]
        # The trainer wrote train.log itself (a pod's stderr stays in the pod's log).
        assert "fake trainer for" in (d.outbox / job["id"] / "train.log").read_text()
        assert kubernetes_validate.validate(k8s_job, KUBERNETES_VERSION, strict=True)
        samples = d.scrape()
        assert samples[("dropfit_job_epochs_total", (("dataset", "Flowers_Big"), ("job_id", job["id"])))] == 3
    finally:
        d.stop()


def test_exit_2_fails_the_job_at_once_and_dropfit_does_not_retry(tmp_path, cluster):
    cluster.kubelet()
    d = k8s_daemon(tmp_path, cluster, retries=3).start()
    try:
        d.drop("bad-data", {"epochs": 3}, fake={"crash_epoch": 1, "exit_code": 2, "error_kind": "data"})
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "failed" and job["outcome"] == "rejected" and job["error_kind"] == "data", job
        assert job["attempt"] == 1 and len(requests(cluster, kmock.action.CREATE)) == 1
        assert stored_job(cluster, job["engine_ref"])["status"]["conditions"][0]["reason"] == "PodFailurePolicy"
    finally:
        d.stop()


def test_a_killed_trainer_gets_a_new_job_and_resumes(tmp_path, cluster):
    cluster.kubelet()
    d = k8s_daemon(tmp_path, cluster).start()
    try:
        d.drop("flaky", {"epochs": 5}, fake={"crash_epoch": 3, "crash_attempts": 1, "sleep": 0.1})
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["attempt"] == 2 and job["epoch"] == 5, job
        posts = requests(cluster, kmock.action.CREATE)
        assert [p.data["metadata"]["labels"]["dropfit.dev/attempt"] for p in posts] == ["1", "2"]
        assert [r["resumed_from"] for r in d.runs(job["id"])] == [0, 2]
        assert "killed by SIGKILL" in d.log() and "BackoffLimitExceeded" in d.log()
    finally:
        d.stop()


def test_the_active_deadline_fails_the_job_as_timeout(tmp_path, cluster):
    cluster.kubelet(deadline=2.0)  # the cluster enforces activeDeadlineSeconds (here on a faster clock)
    d = k8s_daemon(tmp_path, cluster, job_timeout_seconds=600, stop_grace_seconds=1).start()
    try:
        d.drop("stuck", {"epochs": 3}, fake={"hang": True})
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "failed" and job["error_kind"] == "timeout", job
        assert "DeadlineExceeded" in job["error"] and job["attempt"] == 1
    finally:
        d.stop()


def test_a_dropped_watch_and_410_gone_are_survived(tmp_path, cluster):
    cluster.kubelet()
    d = k8s_daemon(tmp_path, cluster).start()
    try:
        d.drop("steady", {"epochs": 30}, fake={"sleep": 0.1})
        wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 2, 30, what="epoch 2")
        # The runner's own lists (by its label selector; the test kubelet lists every Job, all the time).
        runner_lists = lambda: [r for r in requests(cluster, kmock.action.LIST) if r.params.get("labelSelector")]  # noqa: E731
        lists_before = len(runner_lists())
        handler = cluster.server.handler
        cluster.server.call(handler.drop_watches)  # the connection breaks mid-stream
        # The runner saw it, listed again and watches again (its new watch is open on the server): only a watch
        # opened before the compaction below can be told 410 Gone.
        wait_for(lambda: "Kubernetes watch broke" in d.log() and len(runner_lists()) == lists_before + 1
                 and cluster.server.call(lambda: len(handler._watches)) == 1, 10, what="a new watch after the break",
                 show=d.describe)
        # Other objects change (the runner's watch of its Jobs does not see them), then history is compacted: the
        # version the runner watches from is too old now, and its next watch gets 410 Gone.
        core = client.CoreV1Api(cluster.server.api_client())
        [pod] = core.list_namespaced_pod(NS).items
        core.patch_namespaced_pod(pod.metadata.name, NS, {"metadata": {"labels": {"touched": "yes"}}})
        cluster.server.call(handler.compact)
        cluster.server.call(handler.end_watches)
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["epoch"] == 30
        assert len(runner_lists()) == lists_before + 2  # it listed again after the break, and after the 410
        log = d.log()
        assert "Kubernetes watch broke" in log and "410 Gone" in log
    finally:
        d.stop()


def test_cancel_deletes_the_job_with_background_propagation(tmp_path, cluster):
    cluster.kubelet()
    d = k8s_daemon(tmp_path, cluster, stop_grace_seconds=10).start()
    try:
        d.drop("long", {"epochs": 300}, fake={"sleep": 0.1})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 2 and j[0], 30, what="epoch 2")
        assert d.cli("cancel", job["id"]).returncode == 0
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "cancelled" and job["epoch"] < 300
        [delete] = requests(cluster, kmock.action.DELETE)
        policy = delete.params.get("propagationPolicy") or (delete.data or {}).get("propagationPolicy")
        assert delete.name == job["engine_ref"] and policy == "Background"
        assert "stopped on request" in (d.outbox / job["id"] / "train.log").read_text()  # SIGTERM: checkpointed
    finally:
        d.stop()


def test_a_restarted_daemon_re_attaches_without_a_second_post(tmp_path, cluster):
    cluster.kubelet()
    d = k8s_daemon(tmp_path, cluster).start()
    try:
        d.drop("survivor", {"epochs": 40}, fake={"sleep": 0.1})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 3 and j[0], 30, what="epoch 3")
        d.kill9()
        time.sleep(1.0)  # the pod trains on meanwhile
        d.start()
        assert f"re-attached to kubernetes {job['engine_ref']}" in d.log()
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["epoch"] == 40 and job["attempt"] == 1
        assert len(requests(cluster, kmock.action.CREATE)) == 1 and len(d.runs(job["id"])) == 1
    finally:
        d.stop(signal.SIGKILL)


@pytest.mark.parametrize("ignores_sigterm", [False, True], ids=["checkpoints", "ignores-sigterm"])
def test_an_evicted_pod_gets_its_grace_period_and_a_replacement_resumes(tmp_path, cluster, ignores_sigterm):
    kubelet = cluster.kubelet()
    d = k8s_daemon(tmp_path, cluster, stop_grace_seconds=2).start()
    try:
        d.drop("evicted", {"epochs": 60}, fake={"sleep": 0.1, "ignore_sigterm": ignores_sigterm})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 3 and j[0], 30, what="epoch 3")
        evicted_at = time.time()
        kubelet.disrupt(job["engine_ref"])  # a node drain: DisruptionTarget, then a graceful deletion
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["epoch"] == 60 and job["attempt"] == 1, job
        runs = d.runs(job["id"])
        assert len(runs) == 2 and len(requests(cluster, kmock.action.CREATE)) == 1  # the Job replaced the pod
        log = (d.outbox / job["id"] / "train.log").read_text()
        if ignores_sigterm:
            # Only SIGKILL stopped it, once terminationGracePeriodSeconds (stop_grace_seconds) had passed; the
            # replacement pod came after that, not at once.
            assert "stopped on request" not in log
            assert runs[1]["time"] - evicted_at >= 2.0, runs
        else:
            # SIGTERM: it checkpointed, and the replacement resumed exactly where it stopped.
            assert runs[1]["resumed_from"] == stopped_after(log) >= 3, (runs, log)
    finally:
        d.stop()


def test_a_job_waiting_for_a_node_shows_pending_in_kubernetes(tmp_path, cluster):
    cluster.kubelet(capacity=1)
    d = k8s_daemon(tmp_path, cluster).start()
    try:
        d.drop("first", {"epochs": 20}, fake={"sleep": 0.1})
        d.drop("second", {"epochs": 2})
        wait_for(lambda: (j := d.jobs()) and len(j) == 2 and [x["engine_state"] for x in j] == ["running", "pending"],
                 30, what="one running, one pending")
        assert "pending in kubernetes" in d.cli("status").stdout
        assert d.scrape()[("dropfit_jobs_pending_in_engine", ())] == 1
        jobs = d.wait_jobs(2, timeout=60)
        assert [j["state"] for j in jobs] == ["succeeded", "succeeded"]
    finally:
        d.stop()


def test_an_attempt_created_just_before_the_daemon_died_is_adopted_not_submitted_again(tmp_path, cluster):
    cluster.kubelet()
    d = k8s_daemon(tmp_path, cluster).start()
    try:
        d.drop("window", {"epochs": 60}, fake={"sleep": 0.1})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 2 and j[0], 30, what="epoch 2")
        name = job["engine_ref"]
        d.kill9()
        # The ledger as a daemon leaves it that dies after creating the Job but before recording the answer: the
        # start recorded (attempt 1, "submitted"), neither the Job's name nor any event read.
        db = sqlite3.connect(d.state / "ledger.sqlite3")
        with db:
            db.execute("UPDATE jobs SET engine_ref = NULL, engine_state = 'submitted', events_offset = 0, epoch = 0 "
                       "WHERE id = ?", (job["id"],))
        db.close()
        d.start()
        # Found by its name, and recorded: a later restart or a cancel knows it.
        wait_for(lambda: d.jobs()[0]["engine_ref"] == name, 30, what="the Job's name recorded")
        assert f"found attempt 1 of {job['id']} in kubernetes as {name}" in d.log()
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["attempt"] == 1 and job["epoch"] == 60, job
        assert len(requests(cluster, kmock.action.CREATE)) == 1 and len(d.runs(job["id"])) == 1
    finally:
        d.stop(signal.SIGKILL)


@pytest.mark.parametrize("image, reasons, waits", [
    ("registry.example/dropfit:missing", ("ErrImagePull", "ImagePullBackOff"), True),
    ("registry.example/Dropfit:1.0", ("InvalidImageName",), False),  # not a valid reference: waiting cannot help
], ids=["unpullable", "invalid-name"])
def test_a_container_that_cannot_start_fails_the_attempt_and_its_job_is_deleted(tmp_path, cluster, image, reasons,
                                                                              waits):
    cluster.kubelet(unpullable=("registry.example/dropfit:missing",))
    d = k8s_daemon(tmp_path, cluster, kubernetes={"image": image, "container_error_seconds": 3}, retries=2).start()
    try:
        dropped = time.monotonic()
        d.drop("pull", {"epochs": 2})
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "failed" and job["error_kind"] == "engine" and job["attempt"] == 1, job
        assert any(r in job["error"] for r in reasons) and image in job["error"], job["error"]
        assert "the trainer's container could not start" in job["error"]
        if waits:  # the kubelet may still pull it (a registry back up): it gets container_error_seconds
            assert time.monotonic() - dropped >= 3 and "for 3 s" in job["error"]
        assert len(requests(cluster, kmock.action.CREATE)) == 1  # not retried: the same image would not start
        [delete] = requests(cluster, kmock.action.DELETE)
        assert delete.name == job["engine_ref"]
        wait_for(lambda: not k8s_jobs(cluster) and not pods_of(cluster, job["engine_ref"]), 30, what="Job gone")
    finally:
        d.stop()


def test_an_oom_killed_container_fails_the_job_as_out_of_memory(tmp_path, cluster):
    kubelet = cluster.kubelet()
    d = k8s_daemon(tmp_path, cluster, kubernetes={"memory": "2Gi"}, retries=2).start()
    try:
        d.drop("hungry", {"epochs": 100}, fake={"sleep": 0.1})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 2 and j[0], 30, what="epoch 2")
        kubelet.oom_kill(job["engine_ref"])  # over its memory limit: the kernel kills it, the kubelet says so
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "failed" and job["error_kind"] == "oom" and job["attempt"] == 1, job
        assert "OOMKilled" in job["error"] and "2Gi" in job["error"], job["error"]
        # The same limit would kill it again: not retried.
        assert len(requests(cluster, kmock.action.CREATE)) == 1
    finally:
        d.stop()


@pytest.mark.parametrize("retries", [1, 0])
def test_a_job_deleted_outside_dropfit_is_a_crash_retried_once_its_pod_has_stopped(tmp_path, cluster, retries):
    cluster.kubelet()
    d = k8s_daemon(tmp_path, cluster, retries=retries).start()
    try:
        d.drop("deleted", {"epochs": 40}, fake={"sleep": 0.1, "stop_seconds": 2})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 3 and j[0], 30, what="epoch 3")
        first = job["engine_ref"]
        deleted_at = time.time()
        # `kubectl delete job`: its pod gets SIGTERM and takes 2 s to write its checkpoint.
        batch_api(cluster).delete_namespaced_job(first, NS, propagation_policy="Background")
        [job] = d.wait_jobs(1, timeout=60)
        assert f"the Job {first} was deleted outside dropfit" in d.log()
        runs = d.runs(job["id"])
        if retries:
            assert job["state"] == "succeeded" and job["attempt"] == 2 and job["epoch"] == 40, job
            assert len(requests(cluster, kmock.action.CREATE)) == 2
            # The next attempt began after the first had stopped (not racing it for the checkpoint) and resumed
            # where it stopped.
            log = (d.outbox / job["id"] / "train.log").read_text()
            assert runs[1]["time"] >= deleted_at + 2, runs
            assert runs[1]["resumed_from"] == stopped_after(log) >= 3, (runs, log)
        else:
            assert job["state"] == "failed" and job["error_kind"] == "crash", job
            assert "was deleted outside dropfit" in job["error"] and len(runs) == 1
    finally:
        d.stop()


def test_a_job_held_by_kueue_is_pending_however_long_then_runs(tmp_path, cluster):
    cluster.kubelet(kueue=True)  # Kueue's webhook suspends every Job with a queue label
    d = k8s_daemon(tmp_path, cluster, kubernetes={"queue": "team-a"}, job_timeout_seconds=3).start()
    try:
        d.drop("queued", {"epochs": 3}, fake={"sleep": 0.1})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["engine_state"] == "pending" and j[0], 30, what="pending")
        name = job["engine_ref"]
        assert stored_job(cluster, name)["spec"]["suspend"] is True and not pods_of(cluster, name)
        assert "pending in kubernetes" in d.cli("status").stdout
        # Held for longer than job_timeout_seconds: time waiting for quota is not time running.
        held = time.monotonic()
        wait_for(lambda: time.monotonic() - held > 4, 10, what="a hold longer than job_timeout_seconds")
        [job] = d.jobs()
        assert job["state"] == "running" and job["engine_state"] == "pending", job
        batch_api(cluster).patch_namespaced_job(name, NS, {"spec": {"suspend": False}})  # Kueue admits it
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["attempt"] == 1 and job["epoch"] == 3, job
        assert len(requests(cluster, kmock.action.CREATE)) == 1
    finally:
        d.stop()


def test_a_job_preempted_by_kueue_goes_back_to_pending_and_resumes_from_its_checkpoint(tmp_path, cluster):
    cluster.kubelet(kueue=True)
    d = k8s_daemon(tmp_path, cluster, kubernetes={"queue": "team-a"}, retries=0).start()
    batch = batch_api(cluster)
    try:
        d.drop("preempted", {"epochs": 40}, fake={"sleep": 0.1})
        name = wait_for(lambda: (j := d.jobs()) and j[0]["engine_ref"], 30, what="submitted")
        wait_for(lambda: name in k8s_jobs(cluster) and stored_job(cluster, name)["spec"].get("suspend"), 30,
                 what="suspended by the webhook")
        batch.patch_namespaced_job(name, NS, {"spec": {"suspend": False}})  # admitted
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 3 and j[0], 30, what="epoch 3")
        batch.patch_namespaced_job(name, NS, {"spec": {"suspend": True}})  # preempted: its pod is deleted
        train_log = d.outbox / job["id"] / "train.log"
        wait_for(lambda: d.jobs()[0]["engine_state"] == "pending" and not pods_of(cluster, name)
                 and "stopped on request" in train_log.read_text(), 30, what="back to pending, its pod stopped")
        assert d.jobs()[0]["state"] == "running"  # waiting in the engine, not failed nor retried
        batch.patch_namespaced_job(name, NS, {"spec": {"suspend": False}})  # admitted again
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["attempt"] == 1 and job["failures"] == 0, job
        runs = d.runs(job["id"])
        assert len(runs) == 2 and runs[1]["resumed_from"] == stopped_after(train_log.read_text()) >= 3, runs
        assert len(requests(cluster, kmock.action.CREATE)) == 1
    finally:
        d.stop()


def test_finished_jobs_are_cleaned_up_by_their_ttl_after_dropfit_read_their_end(tmp_path, cluster):
    cluster.kubelet(ttl=1.0)  # ttlSecondsAfterFinished on a faster clock
    d = k8s_daemon(tmp_path, cluster).start()
    try:
        d.drop("tidy", {"epochs": 2})
        d.drop("bad", {"epochs": 3}, fake={"crash_epoch": 1, "exit_code": 2, "error_kind": "data"})
        ok, bad = d.wait_jobs(2, timeout=60)
        assert ok["state"] == "succeeded" and bad["outcome"] == "rejected" and bad["error_kind"] == "data", bad
        assert [p.data["spec"]["ttlSecondsAfterFinished"] for p in requests(cluster, kmock.action.CREATE)] == \
            [3600, 3600]
        wait_for(lambda: not k8s_jobs(cluster) and not pods_of(cluster, ok["engine_ref"])
                 and not pods_of(cluster, bad["engine_ref"]), 30, what="Kubernetes deleting the finished Jobs")
        # Their ends were recorded before: the deletions change nothing.
        assert [(j["state"], j["error"]) for j in d.jobs()] == [(ok["state"], ok["error"]), (bad["state"],
                                                                                             bad["error"])]
        assert len(requests(cluster, kmock.action.CREATE)) == 2 and "deleted outside dropfit" not in d.log()
    finally:
        d.stop()


def test_a_job_its_ttl_deleted_before_the_next_poll_keeps_the_end_it_had(tmp_path, cluster):
    cluster.kubelet(ttl=0)  # deleted as soon as it completes, long before the daemon's next poll
    d = k8s_daemon(tmp_path, cluster, poll_interval=3.0).start()
    try:
        d.drop("quick", {"epochs": 2})
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["attempt"] == 1, job
        assert not k8s_jobs(cluster)  # it was gone when its end was read
        assert len(requests(cluster, kmock.action.CREATE)) == 1 and "deleted outside dropfit" not in d.log()
    finally:
        d.stop()


def test_a_job_its_ttl_deleted_while_the_daemon_was_down_is_not_run_again(tmp_path, cluster):
    cluster.kubelet(ttl=0)
    d = k8s_daemon(tmp_path, cluster).start()
    try:
        d.drop("unattended", {"epochs": 30}, fake={"sleep": 0.1})
        job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 2 and j[0], 30, what="epoch 2")
        d.kill9()
        # It completes and Kubernetes deletes it before the daemon is back: nothing is left to re-attach to.
        wait_for(lambda: not k8s_jobs(cluster) and (d.outbox / job["id"] / "fake_finished.jsonl").exists(), 30,
                 what="the Job finished and deleted")
        d.start()
        [job] = d.wait_jobs(1, timeout=60)
        assert job["state"] == "succeeded" and job["epoch"] == 30 and job["attempt"] == 1, job
        assert "its trainer finished while the daemon was down" in d.log()
        assert len(requests(cluster, kmock.action.CREATE)) == 1 and len(d.runs(job["id"])) == 1
    finally:
        d.stop(signal.SIGKILL)


def test_the_kustomize_base_renders_and_validates_strictly():
    kubectl = system_tool("kubectl", "https://kubernetes.io/docs/tasks/tools/")
    proc = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "k8s")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                            "PersistentVolumeClaim", "PersistentVolumeClaim", "Deployment", "Service"]), kinds
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    role = next(d for d in docs if d["kind"] == "Role")
    verbs = {(r["resources"][0], tuple(sorted(r["verbs"]))) for r in role["rules"]}
    assert verbs == {("jobs", ("create", "delete", "get", "list", "watch")), ("pods", ("get", "list"))}
    claims = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims == {"dropfit-ledger": ["ReadWriteOnce"], "dropfit-data": ["ReadWriteMany"]}
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    assert config["runner"]["kind"] == "kubernetes" and config["ledger"].startswith("/var/lib/dropfit")
    # The rendered daemon config is a valid one, and the Job it would create is valid Kubernetes.
    from daemon.config import Config

    Config.model_validate(config)
    assert json.dumps(config)
