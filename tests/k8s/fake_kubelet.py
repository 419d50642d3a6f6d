"""A test "kubelet" and Job controller for the in-memory API server: it plays the cluster's part, through the same
real ``kubernetes`` client and HTTP, so the runner under test meets Jobs that behave.

What it models, as Kubernetes 1.3x does it:

- one Pod per Job at a time, owned by the Job, labelled ``job-name``, with the Job controller's
  ``batch.kubernetes.io/job-tracking`` finalizer; its container command runs as a local process (the stand-in
  trainer, with the container's env) once a slot is free (``capacity``), else the pod stays Pending, unschedulable;
- the pod's phase and the container's ``terminated`` state: exit code (128 + N for death by signal N) and reason
  (``Completed``, ``Error``, or ``OOMKilled`` after `oom_kill`);
- graceful pod deletion: a deleted pod (by a cascade from its Job, an eviction, the Job controller) stays Terminating
  (``deletionTimestamp``) while its process gets SIGTERM and, after ``terminationGracePeriodSeconds``, SIGKILL;
  once it has stopped its final status is written and the finalizer removed, and the pod is gone;
- the Job's ``active``/``ready``/``succeeded``/``failed`` counts and its ``Complete`` or ``Failed`` condition,
  applying the Job's own ``podFailurePolicy`` rules (``FailJob`` on exit codes, ``Ignore`` for a pod with the
  ``DisruptionTarget`` condition, which gets a replacement pod once it has stopped) and ``backoffLimit``;
- ``activeDeadlineSeconds``: the pod is deleted (SIGTERM, grace, SIGKILL) and the Job fails ``DeadlineExceeded``;
- ``spec.suspend`` (Kueue): a suspended Job gets no pod; suspending a running one deletes its pod gracefully, and
  that does not count as a failure (the real controller removes the pod's tracking finalizer before it deletes it,
  so never counts it); resuming it starts a new pod and the deadline's clock again; ``kueue=True`` also plays
  Kueue's webhook, which suspends every Job with a queue label when it is created (the test admits it by setting
  ``suspend: false``, or preempts it by setting it back);
- `disrupt` evicts a Job's pod as the Eviction API does for a node drain: ``DisruptionTarget`` first, then a
  graceful deletion;
- images in ``unpullable`` cannot be pulled: the pod stays Pending with its container ``waiting`` in
  ``ErrImagePull``, then ``ImagePullBackOff`` between retries, as the kubelet reports it; an image reference that is
  not well formed waits in ``InvalidImageName``;
- ``ttlSecondsAfterFinished``: a finished Job is deleted (foreground propagation) after that long.

What it approximates: ``deadline`` and ``ttl`` replace every Job's ``activeDeadlineSeconds`` and
``ttlSecondsAfterFinished`` with these many seconds (a faster clock); the deadline counts from the first pod's start
rather than the Job's ``startTime``; a pod that cannot pull its image takes no slot; the pull back-off is a fixed
two seconds, not 10 s doubling to 5 min; cascades are immediate, where the real garbage collector is asynchronous.

What it does not model: nodes, resources and the scheduler beyond ``capacity``; container restarts and
``restartPolicy: OnFailure``; init containers, probes, volumes, Secrets and ConfigMaps (so no
``CreateContainerConfigError``); Indexed Jobs, parallelism and ``completions``; Kueue's quotas (tests suspend and
resume Jobs by hand); ``--cascade=orphan`` beyond leaving the pod running.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client
from kubernetes.client.rest import ApiException

FINALIZER = "batch.kubernetes.io/job-tracking"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
PULL_BACKOFF_STEPS = 20  # loop steps (0.1 s) between two pulls of an image that cannot be pulled
# The shape of an image reference (docker/distribution's grammar, simplified): what does not match waits in
# InvalidImageName.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(rf"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
                             r"(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Run:
    job: dict  # the Job as last listed
    pod: str | None = None  # its current pod (None: none yet, or the last one has gone)
    proc: subprocess.Popen | None = None
    started: float | None = None  # when it started (or resumed) running: activeDeadlineSeconds counts from here
    pods: int = 0
    failed: int = 0
    term_at: float | None = None  # when its process got SIGTERM
    kill_grace: float = 30.0
    stopping: str | None = None  # why its pod is being deleted: deadline, evicted, suspended, deleted
    oom: bool = False  # its container was OOM-killed
    pull: str | None = None  # the image pull error its pod waits in
    pull_steps: int = 0
    suspended: bool = False  # the Job controller has seen spec.suspend
    gone: bool = False  # the Job was deleted
    done: bool = False  # the Job finished (or went); nothing more to run
    finished_at: float | None = None  # for ttlSecondsAfterFinished


class FakeKubelet:
    def __init__(self, api_client: client.ApiClient, namespace: str, logs: Path, capacity: int = 4,
                 deadline: float | None = None, ttl: float | None = None, unpullable: tuple[str, ...] = (),
                 kueue: bool = False):
        """``deadline``, ``ttl``: enforce these many seconds instead of each Job's activeDeadlineSeconds and
        ttlSecondsAfterFinished (a faster clock). ``unpullable``: images no registry has. ``kueue``: suspend every
        Job with a Kueue queue label when it is created, as Kueue's webhook does."""
        self.deadline, self.ttl, self.unpullable, self.kueue = deadline, ttl, set(unpullable), kueue
        self.batch, self.core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
        self.sanitize = api_client.sanitize_for_serialization
        self.namespace, self.logs, self.capacity = namespace, logs, capacity
        self.runs: dict[str, _Run] = {}
        self.errors: list[str] = []  # what went wrong in the loop while the test ran (see `check`)
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

    def check(self) -> None:
        """Fail if the loop raised while the test ran: a cluster that silently stopped playing its part would leave
        the test waiting on a timeout, or passing on a cluster that did not do what the test says it did."""
        if self.errors:
            raise AssertionError(f"the fake kubelet failed {len(self.errors)} time(s); the first:\n{self.errors[0]}")

    def disrupt(self, name: str) -> None:
        """Evict the Job's running pod as a node drain does (the Eviction API): the pod gets the DisruptionTarget
        condition, then is deleted gracefully (SIGTERM, its grace period, SIGKILL)."""
        with self._lock:
            run = self.runs[name]
            run.stopping = "evicted"
            self.core.patch_namespaced_pod_status(run.pod, self.namespace, {"status": {"conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                 "message": "Eviction API: evicting"}]}})
            self.core.delete_namespaced_pod(run.pod, self.namespace)

    def oom_kill(self, name: str) -> None:
        """The kernel's OOM killer kills the Job's container (it went over its memory limit)."""
        with self._lock:
            run = self.runs[name]
            run.oom = True
            os.killpg(run.proc.pid, signal.SIGKILL)

    # --- the loop ---------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                with self._lock:
                    self._step()
            except Exception as exc:
                if self._stop.is_set():
                    return  # the API server stopping under us at the end of a test: expected
                # Anything else is a failure, kept for `check` (the fixture calls it); the loop carries on so the
                # test can still end and show its own assertion too.
                self.errors.append(traceback.format_exc())
                print(f"fake kubelet: {type(exc).__name__}: {exc}")

    def _step(self) -> None:
        jobs = {j["metadata"]["name"]: j for j in self.sanitize(self.batch.list_namespaced_job(self.namespace))
                .get("items", [])}
        pods = {p["metadata"]["name"]: p for p in self.sanitize(self.core.list_namespaced_pod(self.namespace))
                .get("items", [])}
        for name, job in jobs.items():
            if name not in self.runs:
                self.runs[name] = _Run(job)
                labels = job["metadata"].get("labels") or {}
                if self.kueue and labels.get(KUEUE_QUEUE) and not job["spec"].get("suspend"):
                    job = self.sanitize(self.batch.patch_namespaced_job(name, self.namespace,
                                                                        {"spec": {"suspend": True}}))
            self.runs[name].job = job
        for name, run in self.runs.items():
            if name not in jobs:
                run.gone = True  # its pod, if any, was marked for deletion by the cascade
            self._controller(name, run)
            self._kubelet(name, run, pods.get(run.pod) if run.pod else None)
        self._schedule()
        self._expire()

    # --- the Job controller -------------------------------------------------------------------------------------

    def _controller(self, name: str, run: _Run) -> None:
        """Suspension, resumption and the active deadline: what the Job controller does to a live Job's pod."""
        if run.gone or run.done:
            return
        suspend = bool(run.job["spec"].get("suspend"))
        if suspend and not run.suspended:
            run.suspended = True
            self._condition(name, "Suspended", "True", "JobSuspended", "Job suspended", active=0, ready=0,
                            startTime=None)
            if run.pod is not None:
                self._delete_pod(run, "suspended")
        elif not suspend and run.suspended:
            run.suspended, run.started = False, None
            self._condition(name, "Suspended", "False", "JobResumed", "Job resumed", startTime=_now())
        deadline = run.job["spec"].get("activeDeadlineSeconds")
        if deadline and self.deadline is not None:
            deadline = self.deadline
        if (deadline and run.started is not None and run.stopping is None and run.pod is not None
                and time.monotonic() - run.started > deadline):
            if run.proc is None:  # a replacement pod that has not started yet
                self._delete_pod(run, "deadline")
                self._finish(name, run, "Failed", "DeadlineExceeded", failed=run.failed + 1)
            else:
                self._delete_pod(run, "deadline")

    def _condition(self, name: str, kind: str, status: str, reason: str, message: str, **fields) -> None:
        self.batch.patch_namespaced_job_status(name, self.namespace, {"status": {**fields, "conditions": [
            {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}]}})

    def _delete_pod(self, run: _Run, why: str) -> None:
        if run.proc is None:  # it never started: nothing to stop, it goes at once
            self._release(run.pod)
            self._quiet(self.core.delete_namespaced_pod, run.pod, self.namespace)
            run.pod, run.pull = None, None
            return
        run.stopping = why
        self._quiet(self.core.delete_namespaced_pod, run.pod, self.namespace)  # Terminating until it has stopped

    def _release(self, pod: str) -> None:
        """Remove the tracking finalizer: a pod marked for deletion is then gone; a finished one stays, as
        finished pods do until their Job goes."""
        self._quiet(self.core.patch_namespaced_pod, pod, self.namespace, {"metadata": {"finalizers": []}})

    def _quiet(self, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except ApiException as exc:
            if exc.status != 404:  # gone already: what we wanted
                raise
            return None

    def _pod_ended(self, name: str, run: _Run, code: int, why: str | None) -> None:
        """What the Job controller does when a pod has stopped: succeed, apply podFailurePolicy, or count it."""
        if why == "suspended":
            return None  # deleted by the controller itself: not a failure, and a new pod comes on resume
        spec = run.job["spec"]
        if why == "deadline":
            return self._finish(name, run, "Failed", "DeadlineExceeded", failed=1)
        if code == 0:
            return self._finish(name, run, "Complete", None, succeeded=1)
        for rule in (spec.get("podFailurePolicy") or {}).get("rules", []):
            on_codes = rule.get("onExitCodes")
            on_conditions = rule.get("onPodConditions")
            matches = (on_codes and on_codes["operator"] == "In" and code in on_codes["values"]) or \
                      (on_conditions and why == "evicted" and
                       any(c["type"] == "DisruptionTarget" for c in on_conditions))
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
        run.done, run.finished_at = True, time.monotonic()
        cond = {"type": condition, "status": "True", "lastTransitionTime": _now()}
        if reason:
            cond["reason"] = reason
        self.batch.patch_namespaced_job_status(name, self.namespace, {"status": {
            "active": 0, "ready": 0, "conditions": [cond], "completionTime": _now() if condition == "Complete"
            else None, **counts}})

    def _expire(self) -> None:
        """ttlSecondsAfterFinished: the TTL controller deletes a finished Job, its pods with it (foreground)."""
        for name, run in self.runs.items():
            ttl = run.job["spec"].get("ttlSecondsAfterFinished")
            if ttl is None or run.finished_at is None or run.gone or run.proc is not None:
                continue
            if time.monotonic() - run.finished_at >= (self.ttl if self.ttl is not None else ttl):
                run.gone = True
                self._quiet(self.batch.delete_namespaced_job, name, self.namespace, propagation_policy="Foreground")

    # --- the kubelet --------------------------------------------------------------------------------------------

    def _kubelet(self, name: str, run: _Run, pod: dict | None) -> None:
        """Stop the process of a pod being deleted (SIGTERM, grace, SIGKILL) and report how a process ended."""
        if run.pod is not None and run.proc is None and (run.gone or pod is None):
            self._release(run.pod)  # a pod that never started, of a Job that went
            run.pod = None
        if run.gone and run.pod is None:
            run.done = True
        if run.proc is None:
            if run.pull is not None and pod is not None:
                self._pull(run)
            return
        deleting = pod is None or pod["metadata"].get("deletionTimestamp")
        if deleting and run.term_at is None and run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGTERM)
            run.term_at = time.monotonic()
            run.stopping = run.stopping or "deleted"
        if run.term_at is not None and run.proc.poll() is None and time.monotonic() - run.term_at > run.kill_grace:
            os.killpg(run.proc.pid, signal.SIGKILL)
        status = run.proc.poll()
        if status is None:
            return
        code = status if status >= 0 else 128 - status
        reason = "Completed" if code == 0 else "OOMKilled" if run.oom else "Error"
        pod_status = {"phase": "Succeeded" if code == 0 else "Failed",
                      "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "image": "",
                                             "imageID": "", "state": {"terminated": {
                                                 "exitCode": code, "reason": reason, "finishedAt": _now()}}}]}
        if run.stopping == "evicted":
            pod_status["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                         "reason": "EvictionByEvictionAPI"}]
        self._quiet(self.core.patch_namespaced_pod_status, run.pod, self.namespace, {"status": pod_status})
        self._release(run.pod)
        why = run.stopping
        run.proc, run.pod, run.term_at, run.stopping, run.oom = None, None, None, None, False
        if run.gone:
            run.done = True
        elif not run.done:
            self._pod_ended(name, run, code, why)

    def _pull(self, run: _Run) -> None:
        """A pod whose image cannot be pulled: ErrImagePull at each try, ImagePullBackOff in between."""
        if run.pull == "InvalidImageName":
            return
        run.pull_steps += 1
        reason = "ErrImagePull" if run.pull_steps % PULL_BACKOFF_STEPS == 0 else "ImagePullBackOff"
        if reason != run.pull:
            self._waiting(run, reason)

    def _waiting(self, run: _Run, reason: str) -> None:
        image = run.job["spec"]["template"]["spec"]["containers"][0]["image"]
        run.pull = reason
        message = {"ErrImagePull": f'failed to pull and unpack image "{image}": failed to resolve reference '
                                   f'"{image}": not found',
                   "ImagePullBackOff": f'Back-off pulling image "{image}"',
                   "InvalidImageName": f'Failed to apply default image tag "{image}": couldn\'t parse image name '
                                       f'"{image}": invalid reference format'}[reason]
        self._quiet(self.core.patch_namespaced_pod_status, run.pod, self.namespace, {"status": {
            "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "image": image,
                                   "imageID": "", "state": {"waiting": {"reason": reason, "message": message}}}]}})

    # --- scheduling ---------------------------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Give each live, unsuspended Job without a pod one, and start the pending ones while there is room."""
        running = sum(1 for r in self.runs.values() if r.proc is not None and r.proc.poll() is None)
        for name, run in self.runs.items():
            if run.done or run.gone or run.suspended or run.stopping or run.proc is not None:
                continue
            if run.pod is None:
                self._create_pod(name, run)
            if run.pull is not None:
                continue
            if running < self.capacity:
                self._start_pod(name, run)
                running += 1

    def _create_pod(self, name: str, run: _Run) -> None:
        run.pods += 1
        run.pod = f"{name}-{run.pods}"
        spec = run.job["spec"]["template"]["spec"]
        self.core.create_namespaced_pod(self.namespace, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": run.pod, "finalizers": [FINALIZER],
                         "labels": {**run.job["spec"]["template"]["metadata"]["labels"], "job-name": name,
                                    "batch.kubernetes.io/job-name": name},
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                              "uid": run.job["metadata"]["uid"], "controller": True}]},
            "spec": spec})
        self.batch.patch_namespaced_job_status(name, self.namespace, {"status": {
            "active": 1, "ready": 0, "startTime": run.job.get("status", {}).get("startTime") or _now()}})
        image = spec["containers"][0]["image"]
        if not IMAGE_REFERENCE.match(image):
            self._waiting(run, "InvalidImageName")
        elif image in self.unpullable:
            run.pull_steps = 0
            self._waiting(run, "ErrImagePull")
        else:
            run.pull = None
            self.core.patch_namespaced_pod_status(run.pod, self.namespace, {"status": {
                "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                    "reason": "Unschedulable", "message": "0/1 nodes available"}]}})

    def _start_pod(self, name: str, run: _Run) -> None:
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
        self.batch.patch_namespaced_job_status(name, self.namespace, {"status": {"active": 1, "ready": 1}})
