"""A test "kubelet" and Job controller for the in-memory API server: it plays the cluster's part, through the same
real ``kubernetes`` client and HTTP, so the runner under test meets Jobs that behave.

For every batch/v1 Job it finds it creates a Pod (owned by the Job, labelled ``job-name``), runs the pod's container
command as a local process (the stand-in trainer, with the container's env) once a slot is free (``capacity``;
the others stay Pending, unschedulable), and reports back as the real ones do:

- the pod's phase and the container's ``terminated`` exit code (128 + N for death by signal N);
- the Job's ``active``/``ready``/``succeeded``/``failed`` counts and its ``Complete`` or ``Failed`` condition,
  applying the Job's own ``podFailurePolicy`` rules (``FailJob`` on exit codes, ``Ignore`` for a pod with the
  ``DisruptionTarget`` condition, which gets a replacement pod) and ``backoffLimit``;
- ``activeDeadlineSeconds``: SIGTERM, ``terminationGracePeriodSeconds``, SIGKILL, reason ``DeadlineExceeded``;
- a deleted Job: its process gets SIGTERM, then SIGKILL after the grace period.

`disrupt(job)` evicts a Job's running pod as a node drain would.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Run:
    job: dict
    pod: str | None = None
    proc: subprocess.Popen | None = None
    started: float | None = None
    pods: int = 0
    failed: int = 0
    term_at: float | None = None  # when SIGTERM was sent (deadline or deletion)
    kill_grace: float = 30.0
    deadline_hit: bool = False
    deleted: bool = False
    disrupted: bool = False
    done: bool = False
    log: list = field(default_factory=list)


class FakeKubelet:
    def __init__(self, api_client: client.ApiClient, namespace: str, logs: Path, capacity: int = 4,
                 deadline: float | None = None):
        """``deadline``: enforce this many seconds instead of each Job's activeDeadlineSeconds (a faster clock)."""
        self.deadline = deadline
        self.batch, self.core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
        self.sanitize = api_client.sanitize_for_serialization
        self.namespace, self.logs, self.capacity = namespace, logs, capacity
        self.runs: dict[str, _Run] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)

    def start(self) -> FakeKubelet:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for run in self.runs.values():
            if run.proc is not None and run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait()

    def disrupt(self, name: str) -> None:
        """Evict the Job's running pod, as a node drain does: the process is killed, the pod gets DisruptionTarget."""
        with self._lock:
            run = self.runs[name]
            run.disrupted = True
            os.killpg(run.proc.pid, signal.SIGKILL)

    # --- the loop ---------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                with self._lock:
                    self._step()
            except Exception as exc:  # the API server stopping under us at the end of a test
                if not self._stop.is_set():
                    print(f"fake kubelet: {type(exc).__name__}: {exc}")

    def _step(self) -> None:
        listed = self.sanitize(self.batch.list_namespaced_job(self.namespace))
        present = {j["metadata"]["name"]: j for j in listed.get("items", [])}
        for name, job in present.items():
            if name not in self.runs:
                self.runs[name] = _Run(job)
        for name, run in self.runs.items():
            if run.done:
                continue
            if name not in present and not run.deleted:
                run.deleted = True
                self._terminate(run)
            self._watch_process(name, run)
        running = sum(1 for r in self.runs.values() if r.proc is not None and r.proc.poll() is None)
        for name, run in self.runs.items():
            if not run.done and not run.deleted and run.proc is None and running < self.capacity:
                self._start_pod(name, run)
                running += 1
            elif not run.done and run.proc is None and run.pod is None and not run.deleted:
                self._pending_pod(name, run)

    def _pending_pod(self, name: str, run: _Run) -> None:
        run.pods += 1
        run.pod = f"{name}-{run.pods}"
        self.core.create_namespaced_pod(self.namespace, self._pod(name, run))
        self.core.patch_namespaced_pod_status(run.pod, self.namespace, {"status": {
            "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                "reason": "Unschedulable", "message": "0/1 nodes available"}]}})
        self.batch.patch_namespaced_job_status(name, self.namespace, {"status": {"active": 1, "ready": 0,
                                                                                "startTime": _now()}})

    def _pod(self, name: str, run: _Run) -> dict:
        spec = run.job["spec"]["template"]["spec"]
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": run.pod, "labels": {**run.job["spec"]["template"]["metadata"]["labels"],
                                                         "job-name": name, "batch.kubernetes.io/job-name": name},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                  "uid": run.job["metadata"]["uid"], "controller": True}]},
                "spec": spec}

    def _start_pod(self, name: str, run: _Run) -> None:
        if run.pod is None:
            run.pods += 1
            run.pod = f"{name}-{run.pods}"
            self.core.create_namespaced_pod(self.namespace, self._pod(name, run))
        container = run.job["spec"]["template"]["spec"]["containers"][0]
        env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", [])}}
        env.pop("DROPFIT_PARENT_PID", None)
        with open(self.logs / f"{run.pod}.log", "ab") as log:  # the container's log, as `kubectl logs` shows it
            run.proc = subprocess.Popen([*container["command"], *container.get("args", [])], env=env,
                                        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        run.started = run.started or time.monotonic()
        run.kill_grace = float(run.job["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30))
        self.core.patch_namespaced_pod_status(run.pod, self.namespace, {"status": {
            "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0, "image": container["image"],
                                   "imageID": "", "state": {"running": {"startedAt": _now()}}}]}})
        self.batch.patch_namespaced_job_status(name, self.namespace, {"status": {"active": 1, "ready": 1,
                                                                                "startTime": _now()}})

    def _terminate(self, run: _Run) -> None:
        if run.proc is not None and run.proc.poll() is None and run.term_at is None:
            os.killpg(run.proc.pid, signal.SIGTERM)
            run.term_at = time.monotonic()
        elif run.proc is None:
            run.done = True

    def _watch_process(self, name: str, run: _Run) -> None:
        if run.proc is None:
            return
        deadline = run.job["spec"].get("activeDeadlineSeconds")
        if deadline and self.deadline is not None:
            deadline = self.deadline
        if deadline and not run.deadline_hit and time.monotonic() - run.started > deadline:
            run.deadline_hit = True
            self._terminate(run)
        if run.term_at is not None and run.proc.poll() is None and time.monotonic() - run.term_at > run.kill_grace:
            os.killpg(run.proc.pid, signal.SIGKILL)
        status = run.proc.poll()
        if status is None:
            return
        code = status if status >= 0 else 128 - status
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": _now()}
        if -status == signal.SIGKILL and not run.disrupted:
            terminated["reason"] = "OOMKilled" if code == 137 and run.term_at is None else "Error"
        pod_status = {"phase": "Succeeded" if code == 0 else "Failed",
                      "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "image": "",
                                             "imageID": "", "state": {"terminated": terminated}}]}
        if run.disrupted:
            pod_status["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                         "reason": "EvictionByEvictionAPI"}]
        if not run.deleted:
            self.core.patch_namespaced_pod_status(run.pod, self.namespace, {"status": pod_status})
        run.proc, run.pod, run.term_at = None, None, None
        if run.deleted:
            run.done = True
            return
        self._job_controller(name, run, code, run.disrupted)
        run.disrupted = False

    def _job_controller(self, name: str, run: _Run, code: int, disrupted: bool) -> None:
        """What the Job controller does when a pod ends: succeed, apply podFailurePolicy, or count a failure."""
        spec = run.job["spec"]
        if run.deadline_hit:
            return self._finish(name, run, "Failed", "DeadlineExceeded", failed=1)
        if code == 0:
            return self._finish(name, run, "Complete", None, succeeded=1)
        for rule in (spec.get("podFailurePolicy") or {}).get("rules", []):
            on_codes = rule.get("onExitCodes")
            on_conditions = rule.get("onPodConditions")
            matches = (on_codes and on_codes["operator"] == "In" and code in on_codes["values"]) or \
                      (on_conditions and disrupted and any(c["type"] == "DisruptionTarget" for c in on_conditions))
            if matches:
                if rule["action"] == "FailJob":
                    return self._finish(name, run, "Failed", "PodFailurePolicy", failed=1)
                if rule["action"] == "Ignore":  # not counted: a replacement pod runs
                    self.batch.patch_namespaced_job_status(name, self.namespace, {"status": {"active": 0,
                                                                                            "ready": 0}})
                    return None
        run.failed += 1
        if run.failed > spec.get("backoffLimit", 6):
            return self._finish(name, run, "Failed", "BackoffLimitExceeded", failed=run.failed)
        return None

    def _finish(self, name: str, run: _Run, condition: str, reason: str | None, **counts) -> None:
        run.done = True
        cond = {"type": condition, "status": "True", "lastTransitionTime": _now()}
        if reason:
            cond["reason"] = reason
        self.batch.patch_namespaced_job_status(name, self.namespace, {"status": {
            "active": 0, "ready": 0, "conditions": [cond], "completionTime": _now() if condition == "Complete"
            else None, **counts}})
