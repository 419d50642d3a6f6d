"""The Kubernetes runner against a real cluster: `make k8s-e2e` with ``$KUBECONFIG`` (never in CI, which has no
cluster; skipped otherwise). It needs the namespace, RBAC and data claim of deploy/k8s, and the dropfit image
pushed where the cluster can pull it:

    DROPFIT_IMAGE=registry.example.com/dropfit:0.1.0 DROPFIT_K8S_NAMESPACE=dropfit make k8s-e2e

It runs three tiny Jobs through the runner (python in the image, no data): one that completes, one that exits 2
(failed at once by the podFailurePolicy) and one cancelled while it sleeps; each end must be read back as dropfit
reads it in production.
"""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.optional_environment


@pytest.fixture
def runner(tmp_path):
    if not os.environ.get("KUBECONFIG") or not os.environ.get("DROPFIT_IMAGE"):
        pytest.skip("needs a Kubernetes cluster: set KUBECONFIG and DROPFIT_IMAGE (make k8s-e2e)")
    from daemon.config import Config
    from daemon.runners.kubernetes import KubernetesRunner

    namespace = os.environ.get("DROPFIT_K8S_NAMESPACE", "dropfit")
    config = Config(inbox="/data/inbox", outbox="/data/outbox", state_dir="/data/state", archive_dir="/data/archive",
                    stop_grace_seconds=5, runner={"kind": "kubernetes", "poll_interval": 2.0, "kubernetes": {
                        "namespace": namespace, "image": os.environ["DROPFIT_IMAGE"], "gpus_per_job": 0,
                        "kubeconfig": os.environ["KUBECONFIG"], "instance": f"e2e-{os.getpid()}",
                        "data_claim": os.environ.get("DROPFIT_K8S_DATA_CLAIM", "dropfit-data")}})
    messages: queue.SimpleQueue = queue.SimpleQueue()
    r = KubernetesRunner(messages.put, config)
    r.start()
    yield r, messages
    r.stop()


def _end(messages, job_id: str, timeout: float = 300):
    from daemon.messages import TrainerExit

    deadline = time.monotonic() + timeout
    seen = []  # what the runner said meanwhile, for the timeout's message
    while time.monotonic() < deadline:
        try:
            message = messages.get(timeout=5)
        except queue.Empty:
            continue
        if isinstance(message, TrainerExit) and message.job_id == job_id:
            return message
        seen.append(message)
    raise AssertionError(f"{job_id} did not end within {timeout} s; the runner's last messages: {seen[-10:]!r}")


def test_jobs_on_a_real_cluster_complete_fail_and_cancel(runner):
    from daemon.runners.base import Launch

    r, messages = runner
    stamp = time.strftime("%H%M%S")
    cases = {"ok": ("import sys; sys.exit(0)", 0), "bad": ("import sys; sys.exit(2)", 2),
             "slow": ("import time; time.sleep(600)", None)}
    attempts = {}
    for name, (code, _) in cases.items():
        job_id = f"e2e-{name}-{stamp}"
        launch = Launch(job_id, 1, ["python", "-c", code], {}, Path("/tmp/unused.log"), timeout=900, grace=5)
        attempts[name] = r.submit(launch)
    assert _end(messages, f"e2e-ok-{stamp}").status == 0
    bad = _end(messages, f"e2e-bad-{stamp}")
    assert bad.status == 2 and "PodFailurePolicy" in (bad.detail or "")
    time.sleep(10)  # on purpose, not a wait for a condition: the slow one is cancelled once it has had time to run
    attempts["slow"].terminate()
    assert _end(messages, f"e2e-slow-{stamp}").cancelled
