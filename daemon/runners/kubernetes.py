"""The Kubernetes runner: one ``batch/v1`` Job per attempt, through the official ``kubernetes`` client (the optional
``dropfit[kubernetes]`` extra, imported only when this runner is configured).

- dropfit stays the only retry authority: ``backoffLimit: 0``, ``restartPolicy: Never``; a ``podFailurePolicy`` fails
  the Job at once on exit 2 (unusable data) and ignores pods that were disrupted (``DisruptionTarget``: a drained or
  preempted node), so the Job controller replaces them and the trainer resumes from its checkpoint;
- ``activeDeadlineSeconds`` from ``job_timeout_seconds`` (the daemon also stops it itself),
  ``terminationGracePeriodSeconds`` from ``stop_grace_seconds``, ``nvidia.com/gpu`` in the limits, and the Kueue
  queue label when ``runner.kubernetes.queue`` is set;
- names are DNS-1123 (``dropfit-<hash of the job id>-<attempt>``); the job id itself is an annotation;
- the runner lists and watches its Jobs by label (relisting on ``410 Gone`` and after a dropped watch), reads exit
  codes from the Job's pods, and follows the trainer's events file on the shared volume;
- cancelling deletes the Job with background propagation and the grace period, so the trainer checkpoints;
- an attempt whose Job is gone ends only once its pod has stopped (a next attempt must not race it for the
  checkpoint); a Job deleted by someone else is a crash, retried like one; a Job that ended and was then deleted by
  ``ttlSecondsAfterFinished`` keeps the end the watch saw;
- a container that cannot start (ErrImagePull, ImagePullBackOff, CreateContainerConfigError...) fails the attempt
  after ``container_error_seconds`` (InvalidImageName at once) and its Job is deleted; an OOMKilled container fails
  the job as out of memory (not retried: the same limit would kill it again);
- a suspended Job (Kueue: not admitted yet, or preempted) is pending, not failed.

The data volume (inbox, outbox, state: a ReadWriteMany claim) is mounted at the same path in the daemon's pod and in
every trainer pod, so every path the daemon hands a trainer is valid there. The ledger stays on its own disk.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

from contract.protocol import Error, ErrorKind, ExitCode
from daemon.config import Config
from daemon.ledger import Job
from daemon.runners.base import Launch, SubmitError
from daemon.runners.remote import EngineError, EngineStatus, RemoteAttempt, RemoteRunner

log = logging.getLogger(__name__)

MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "dropfit.dev/instance"
JOB_HASH = "dropfit.dev/job-hash"
ATTEMPT = "dropfit.dev/attempt"
JOB_ID = "dropfit.dev/job-id"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
CONTAINER = "trainer"
WATCH_SECONDS = 60  # each watch call ends after this long and is made again (a proxy may drop idle ones anyway)
# Why a container waits instead of starting, when it will not start by itself: after
# `runner.kubernetes.container_error_seconds` the attempt fails (the kubelet would retry the pull forever).
IMAGE_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull"})
CONFIG_ERRORS = frozenset({"CreateContainerConfigError", "CreateContainerError"})
NEVER_STARTS = frozenset({"InvalidImageName"})  # the image reference itself is malformed: waiting cannot help
FINISHED_PHASES = ("Succeeded", "Failed")
# After its Job is gone, how much longer than its grace period a pod may take to stop before the attempt is taken as
# ended anyway (a pod on a lost node stays Terminating until someone removes the node).
POD_STOP_SLACK = 60.0


def job_name(job_id: str, attempt: int) -> str:
    """A DNS-1123 name (lowercase, at most 63 characters) for one attempt; job ids are longer and mixed-case."""
    return f"dropfit-{hashlib.sha256(job_id.encode()).hexdigest()[:12]}-{attempt}"


def job_hash(job_id: str) -> str:
    return hashlib.sha256(job_id.encode()).hexdigest()[:12]


class KubernetesRunner(RemoteRunner):
    kind = "kubernetes"
    # Container output goes to the pod's log, not to the shared storage: the trainer writes train.log itself.
    writes_own_log = True

    def __init__(self, post, config: Config, api_client=None):
        super().__init__(post, config.max_concurrent_jobs, config.runner.poll_interval)
        self.config, self.k8s = config, config.runner.kubernetes
        self.trainer_command = list(self.k8s.command)
        self.jobs_dir = config.path("state_dir") / "jobs"
        mount = Path(self.k8s.data_mount)
        for name in ("inbox", "outbox", "state_dir"):
            if not config.path(name).is_relative_to(mount):
                raise ValueError(f"runner.kubernetes.data_mount: {name} {config.path(name)} is not under "
                                 f"{mount}, where the trainer pods mount the data volume; put the folders on that "
                                 "volume (or set data_mount to where it is mounted)")
        self.selector = f"{MANAGED_BY}=dropfit,{INSTANCE}={self.k8s.instance}"
        self._api = api_client
        self._cache: dict[str, dict] = {}  # Job name -> the Job as last seen (a dict)
        self._deleted: dict[str, dict] = {}  # Job name -> how the watch last saw a followed Job that was deleted
        self._gone_at: dict[str, float] = {}  # Job name -> when a followed Job was first found gone
        self._stuck: dict[str, float] = {}  # Job name -> since when its container cannot start
        self._listed = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- the client ---------------------------------------------------------------------------------------------

    def _client(self):
        if self._api is None:
            from kubernetes import client, config

            if self.k8s.kubeconfig:
                config.load_kube_config(config_file=self.k8s.kubeconfig)
            else:
                try:
                    config.load_incluster_config()
                except config.ConfigException:
                    config.load_kube_config()
            self._api = client.ApiClient()
        return self._api

    @property
    def batch(self):
        from kubernetes import client

        return client.BatchV1Api(self._client())

    @property
    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self._client())

    def _dict(self, obj) -> dict:
        return obj if isinstance(obj, dict) else self._client().sanitize_for_serialization(obj)

    def describe(self) -> str:
        return (f"batch/v1 Jobs in namespace {self.k8s.namespace} (image {self.k8s.image}), up to "
                f"{self.max_submitted} at once")

    def events_path(self, job: Job) -> Path:
        return self.jobs_dir / job.id / "work" / "events.jsonl"

    # --- the Job ------------------------------------------------------------------------------------------------

    def render(self, launch: Launch) -> dict:
        """The ``batch/v1`` Job of one attempt."""
        k = self.k8s
        name = job_name(launch.job_id, launch.attempt)
        labels = {MANAGED_BY: "dropfit", INSTANCE: k.instance, JOB_HASH: job_hash(launch.job_id),
                  ATTEMPT: str(launch.attempt)}
        if k.queue:
            labels[KUEUE_QUEUE] = k.queue
        gpus = (k.multi_gpu_gpus or k.gpus_per_job) if launch.multi_gpu else k.gpus_per_job
        requests, limits = {}, {}
        if k.cpu:
            requests["cpu"] = k.cpu
        if k.memory:
            requests["memory"] = limits["memory"] = k.memory
        if gpus:
            limits["nvidia.com/gpu"] = str(gpus)
        container = {
            "name": CONTAINER, "image": k.image, "imagePullPolicy": k.image_pull_policy,
            "command": launch.argv[:len(self.trainer_command)], "args": launch.argv[len(self.trainer_command):],
            "env": [{"name": key, "value": value} for key, value in sorted(launch.env.items())],
            "volumeMounts": [{"name": "data", "mountPath": k.data_mount}],
        }
        if requests or limits:
            container["resources"] = {key: value for key, value in (("requests", requests), ("limits", limits))
                                      if value}
        pod_spec = {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": int(launch.grace),
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": k.data_claim}}],
        }
        if k.service_account:
            pod_spec["serviceAccountName"] = k.service_account
        if k.node_selector:
            pod_spec["nodeSelector"] = dict(k.node_selector)
        if k.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in k.tolerations]
        spec = {
            # dropfit decides retries (daemon.decision): the Job never retries a pod by itself.
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": [
                # Unusable data or spec: failing again would not help. (A plain int: the manifest is JSON.)
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                      "values": [int(ExitCode.INVALID)]}},
                # A drained or preempted node is nobody's fault: a new pod resumes from the checkpoint.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        }
        if launch.timeout:
            spec["activeDeadlineSeconds"] = int(launch.timeout + launch.grace) + 60
        if k.ttl_seconds_after_finished is not None:
            # Finished Jobs and their pods would pile up in the namespace forever; the end is read long before.
            spec["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
        return {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "namespace": k.namespace, "labels": labels,
                             "annotations": {JOB_ID: launch.job_id}},
                "spec": spec}

    def _submit(self, launch: Launch) -> tuple[str, dict]:
        from kubernetes.client.rest import ApiException

        for path in (launch.log_path.parent, launch.events_file.parent if launch.events_file else None):
            if path is not None:
                path.mkdir(parents=True, exist_ok=True)
        body = self.render(launch)
        name = body["metadata"]["name"]
        try:
            self.batch.create_namespaced_job(self.k8s.namespace, body)
        except ApiException as exc:
            if exc.status == 409:  # created by a submission whose answer we lost: it is ours
                log.warning("Job %s already exists; following it", name)
                return name, {"host": None}
            permanent = exc.status is not None and 400 <= exc.status < 500 and exc.status != 429
            raise SubmitError(f"{exc.status} {exc.reason}: {_message(exc)}", permanent=permanent) from None
        except Exception as exc:  # connection refused, TLS, DNS: the API server may come back
            raise SubmitError(f"{type(exc).__name__}: {exc}") from None
        self._cache.setdefault(name, {"metadata": {"name": name}, "status": {}})
        return name, {"host": None}

    # --- following ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="kubernetes-watch", daemon=True)
        self._watcher.start()
        super().start()

    def _relist(self) -> str:
        listed = self.batch.list_namespaced_job(self.k8s.namespace, label_selector=self.selector)
        listed = self._dict(listed)
        self._cache = {j["metadata"]["name"]: j for j in listed.get("items", [])}
        self._listed.set()
        return listed.get("metadata", {}).get("resourceVersion")

    def _watch(self) -> None:
        """Keep ``_cache`` current: list, then watch from that version; relist on 410 Gone or a broken watch."""
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        version, backoff = None, 0.5
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist()
                stream = watch.Watch()
                for event in stream.stream(self.batch.list_namespaced_job, self.k8s.namespace,
                                           label_selector=self.selector, resource_version=version,
                                           timeout_seconds=WATCH_SECONDS, _request_timeout=WATCH_SECONDS + 30):
                    obj = self._dict(event["object"])
                    name = obj.get("metadata", {}).get("name")
                    if event["type"] == "DELETED":
                        self._cache.pop(name, None)
                        if name in self._followed():
                            # Its end may not be read yet (ttlSecondsAfterFinished): keep what the watch saw.
                            self._deleted[name] = obj
                    elif name:
                        self._cache[name] = obj
                    version = obj.get("metadata", {}).get("resourceVersion") or version
                    if self._stop.is_set():
                        stream.stop()
                backoff = 0.5
            except ApiException as exc:
                if exc.status == 410:  # our version is too old: start again from a fresh list
                    log.info("Kubernetes watch expired (410 Gone); listing the Jobs again")
                    version = None
                    continue
                log.warning("Kubernetes watch failed (%s %s); again in %.0f s", exc.status, exc.reason, backoff)
                version = None
            except Exception as exc:  # a dropped connection, the API server restarting
                log.warning("Kubernetes watch broke (%s); listing again in %.1f s", type(exc).__name__, backoff)
                version = None
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 30)

    def _statuses(self, attempts: list[RemoteAttempt]) -> dict[str, EngineStatus]:
        from kubernetes.client.rest import ApiException

        if not self._listed.is_set():
            try:
                self._relist()
            except ApiException as exc:
                raise EngineError(f"{exc.status} {exc.reason}") from None
            except Exception as exc:
                raise EngineError(f"{type(exc).__name__}: {exc}") from None
        out = {}
        for attempt in attempts:
            job = self._cache.get(attempt.ref) or self._read(attempt.ref)
            status = self._status(attempt.ref, job) if job is not None else self._gone(attempt)
            if status is not None:
                out[attempt.ref] = status
        return out

    def _followed(self) -> set[str]:
        with self._lock:
            return {a.ref for a in self.active.values()}

    def _gone(self, attempt: RemoteAttempt) -> EngineStatus | None:
        """An attempt whose Job no longer exists: its end, still stopping, or None (unknown: see `_lost`)."""
        name = attempt.ref
        last = self._deleted.get(name)
        if last is not None and _finished(last):
            return self._status(name, last)  # it ended, then went (ttlSecondsAfterFinished): that end stands
        live = [p["metadata"]["name"] for p in self._pods(name)
                if (p.get("status") or {}).get("phase") not in FINISHED_PHASES]
        if live:
            since = self._gone_at.setdefault(name, time.monotonic())
            if time.monotonic() - since < self.config.stop_grace_seconds + POD_STOP_SLACK:
                # Still checkpointing after its SIGTERM: a next attempt now would race it for the checkpoint.
                state = attempt.last_state if attempt.last_state in ("pending", "running") else "running"
                return EngineStatus(state)
            log.warning("Job %s is gone but its pod %s has not stopped %.0f s after; taking the attempt as ended",
                        name, live[0], time.monotonic() - since)
        if attempt.cancel_sent:  # we deleted it (a cancel or a timeout)
            return EngineStatus("ended", "kubernetes: the Job was deleted", status=-15, cancelled=True)
        return None

    def _lost(self, attempt: RemoteAttempt) -> EngineStatus | None:
        # Not ours (a cancel deletes through `cancel`), not ended before (the watch would have seen it): someone ran
        # `kubectl delete job`. A crash, retried like one: to stop a job, `dropfit cancel` says so unambiguously.
        code, _ = self._exit_code(attempt.ref)
        return EngineStatus("ended", f"kubernetes: the Job {attempt.ref} was deleted outside dropfit",
                            status=code if code is not None else -15)

    def lookup(self, job: Job) -> str | None:
        """The Job of ``job``'s current attempt, by its name (`job_name`), if it exists and is that job's."""
        name = job_name(job.id, job.attempt)
        found = self._read(name)
        if found is None:
            return None
        if ((found.get("metadata") or {}).get("annotations") or {}).get(JOB_ID) != job.id:
            log.warning("Job %s exists but belongs to another job id; not adopting it", name)
            return None
        return name

    def release(self, job_id: str) -> None:
        with self._lock:
            attempt = self.active.get(job_id)
        if attempt is not None:
            for known in (self._deleted, self._gone_at, self._stuck):
                known.pop(attempt.ref, None)
        super().release(job_id)

    def _read(self, name: str) -> dict | None:
        from kubernetes.client.rest import ApiException

        try:
            job = self._dict(self.batch.read_namespaced_job(name, self.k8s.namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise EngineError(f"{exc.status} {exc.reason}") from None
        except Exception as exc:
            raise EngineError(f"{type(exc).__name__}: {exc}") from None
        self._cache[name] = job
        return job

    def _status(self, name: str, job: dict) -> EngineStatus:
        status = job.get("status") or {}
        conditions = _conditions(job)
        if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
            return EngineStatus("ended", status=0)
        failed = conditions.get("Failed") or conditions.get("FailureTarget")
        if failed:
            reason = failed.get("reason") or "Failed"
            code, why = self._exit_code(name)
            error = None
            if why == "OOMKilled":
                error = Error(kind=ErrorKind.OOM, message=self._oom_message(), job=_job_id(job))
            return EngineStatus("ended", f"kubernetes: {reason}" + (f", {why}" if why else ""),
                                status=code if code is not None else -9, timed_out=reason == "DeadlineExceeded",
                                error=error)
        if (job.get("spec") or {}).get("suspend"):
            # Kueue holds it (not admitted yet, or preempted: its pods were deleted): it waits, it has not failed.
            self._stuck.pop(name, None)
            return EngineStatus("pending", "suspended (waiting for its Kueue quota)")
        if not status.get("ready") and not status.get("active"):
            return EngineStatus("pending", "no pod running yet")
        pods = self._pods(name)
        if status.get("ready") or any((p.get("status") or {}).get("phase") == "Running" for p in pods):
            self._stuck.pop(name, None)
            return EngineStatus("running", started_at=_started_at(pods))
        return self._waiting(name, job, pods)

    def _waiting(self, name: str, job: dict, pods: list[dict]) -> EngineStatus:
        """A Job with a pod that has not started: pending, or ended if its container cannot start."""
        for pod in pods:
            if (pod.get("metadata") or {}).get("deletionTimestamp"):
                continue
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                reason = waiting.get("reason")
                if reason in IMAGE_ERRORS | CONFIG_ERRORS | NEVER_STARTS:
                    return self._cannot_start(name, job, reason, waiting.get("message") or "")
        self._stuck.pop(name, None)
        return EngineStatus("pending", "no pod running yet")

    def _cannot_start(self, name: str, job: dict, reason: str, message: str) -> EngineStatus:
        now = time.monotonic()
        if name not in self._stuck:
            log.warning("Job %s: its container cannot start (%s: %s); the attempt fails if that lasts %.0f s", name,
                        reason, message, 0 if reason in NEVER_STARTS else self.k8s.container_error_seconds)
        since = self._stuck.setdefault(name, now)
        if reason not in NEVER_STARTS and now - since < self.k8s.container_error_seconds:
            return EngineStatus("pending", f"{reason}: {message}" if message else reason)
        if reason in CONFIG_ERRORS:
            hint = "check what the pod refers to (a Secret or ConfigMap that does not exist?)"
        else:
            hint = (f"check runner.kubernetes.image ({self.k8s.image}) and that the cluster can pull it "
                    "(registry, tag, imagePullSecrets)")
        waited = "" if reason in NEVER_STARTS else f" for {now - since:.0f} s"
        text = f"the trainer's container could not start{waited} in kubernetes: {reason}" + \
            (f" ({message})" if message else "") + f"; {hint}"
        log.error("Job %s: %s; deleting it", name, text)
        self._delete(name, grace=0)
        return EngineStatus("ended", f"kubernetes: {reason}", status=ExitCode.FAILED,
                            error=Error(kind=ErrorKind.ENGINE, message=text, job=_job_id(job)))

    def _oom_message(self) -> str:
        if self.k8s.memory:
            return (f"its container went over its memory limit (runner.kubernetes.memory: {self.k8s.memory}) and was "
                    "OOMKilled; raise the limit or lower batch_size in job.yaml")
        return ("its container was OOMKilled: the node ran out of memory (no runner.kubernetes.memory is set, so "
                "the pod was given none in particular); set one")

    def _pods(self, name: str) -> list[dict]:
        try:
            pods = self.core.list_namespaced_pod(self.k8s.namespace, label_selector=f"job-name={name}")
        except Exception as exc:
            log.warning("cannot list the pods of Job %s: %s", name, exc)
            return []
        return self._dict(pods).get("items", [])

    def _exit_code(self, name: str) -> tuple[int | None, str | None]:
        """The trainer container's exit of the Job's newest finished pod: (status or minus the signal, reason)."""
        best = None
        for pod in self._pods(name):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated")
                if cs.get("name") == CONTAINER and term:
                    when = term.get("finishedAt") or ""
                    if best is None or when >= best[0]:
                        best = (when, term)
        if best is None:
            return None, None
        term = best[1]
        code, sig = int(term.get("exitCode", 0)), term.get("signal")
        if sig:
            return -int(sig), term.get("reason")
        if code > 128:  # the container runtime reports death by signal N as 128 + N
            return -(code - 128), term.get("reason")
        return code, term.get("reason") if term.get("reason") not in (None, "Completed", "Error") else None

    def cancel(self, attempt: RemoteAttempt, graceful: bool) -> None:
        attempt.cancel_sent = True
        self._delete(attempt.ref, int(self.config.stop_grace_seconds) if graceful else 0)

    def _delete(self, name: str, grace: int) -> None:
        try:
            # Background: the Job goes at once and its pods get SIGTERM with the grace period (the trainer
            # checkpoints); without a policy batch/v1 would orphan the pods.
            self.batch.delete_namespaced_job(name, self.k8s.namespace, propagation_policy="Background",
                                             grace_period_seconds=grace)
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status != 404:
                log.error("deleting Job %s failed: %s", name, exc)


def _conditions(job: dict) -> dict[str, dict]:
    """The Job's conditions that hold, by type."""
    status = job.get("status") or {}
    return {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}


def _finished(job: dict) -> bool:
    return bool(_conditions(job).keys() & {"Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"})


def _job_id(job: dict) -> str | None:
    return ((job.get("metadata") or {}).get("annotations") or {}).get(JOB_ID)


def _started_at(pods: list[dict]) -> float | None:
    """When the trainer container of the newest running pod started (Unix time): what the timeout counts from."""
    import calendar

    times = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            started = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
            if cs.get("name") == CONTAINER and started:
                try:
                    times.append(calendar.timegm(time.strptime(str(started)[:19], "%Y-%m-%dT%H:%M:%S")))
                except ValueError:
                    continue
    return float(max(times)) if times else None


def _message(exc) -> str:
    import json

    try:
        return json.loads(exc.body).get("message") or str(exc.body)
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or exc)

