"""Prometheus metrics: all defined here, on a registry passed in (tests use their own), served with ``/healthz``.

Per-job series carry ``job_id`` and ``dataset`` labels and are removed a while after the job ends, so the number of
series stays bounded however many jobs run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import MetricsHandler

from contract.protocol import JobKind
from daemon.config import NOTIFY_EVENTS
from daemon.ledger import OUTCOMES

log = logging.getLogger(__name__)
# The `_created` companion series double what a scrape carries and no dashboard of ours uses them.
disable_created_metrics()

_JOB = ("job_id", "dataset")
EPOCH_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
JOB_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self, registry: CollectorRegistry | None = None, version: str = "0"):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.jobs = Counter("dropfit_jobs", "Jobs that ended, by outcome and kind (train or predict).",
                            ["outcome", "kind"], registry=r)
        for outcome in OUTCOMES:
            for kind in (k.value for k in JobKind):
                self.jobs.labels(outcome, kind)
        self.notifications = Counter("dropfit_notifications", "Webhook deliveries, by job event and result "
                                     "(delivered, or failed after every retry).", ["event", "result"], registry=r)
        for event in NOTIFY_EVENTS:
            for result in ("delivered", "failed"):
                self.notifications.labels(event, result)
        self.images_predicted = Counter("dropfit_images_predicted", "Images labelled by prediction jobs.",
                                        registry=r)
        self.queued = Gauge("dropfit_jobs_queued", "Jobs waiting for a free slot.", registry=r)
        self.running = Gauge("dropfit_jobs_running", "Jobs whose trainer is running.", registry=r)
        self.pending_in_engine = Gauge("dropfit_jobs_pending_in_engine",
                                       "Jobs handed to Slurm or Kubernetes that wait there for resources.", registry=r)
        self.submit_errors = Counter("dropfit_submit_errors", "Submissions a cluster engine refused or failed.",
                                     ["engine"], registry=r)
        for engine in ("local", "slurm", "kubernetes"):
            self.submit_errors.labels(engine)
        self.inbox_pending = Gauge("dropfit_inbox_pending", "Folders in the inbox waiting to settle.", registry=r)
        self.job_epoch = Gauge("dropfit_job_epoch", "Last completed epoch of a running job.", _JOB, registry=r)
        self.job_epochs_planned = Gauge("dropfit_job_epochs_planned", "Epochs a running job trains for.", _JOB,
                                        registry=r)
        # A counter (so `_total` is right by Prometheus' conventions): rate() gives epochs per second.
        self.job_epochs_done = Counter("dropfit_job_epochs", "Epochs a job completed under this daemon.", _JOB,
                                       registry=r)
        self.job_loss = Gauge("dropfit_job_loss", "Loss at the last completed epoch.", (*_JOB, "split"), registry=r)
        self.job_accuracy = Gauge("dropfit_job_accuracy", "Accuracy at the last completed epoch.", (*_JOB, "split"),
                                  registry=r)
        self.job_images_per_second = Gauge("dropfit_job_images_per_second",
                                           "Throughput: training (the last completed epoch) or labelling (a prediction "
                                           "job).", _JOB, registry=r)
        self.job_time_budget = Gauge("dropfit_job_time_budget_seconds", "A job's time budget (job.yaml time_budget).",
                                     _JOB, registry=r)
        self.job_deadline = Gauge("dropfit_job_deadline_timestamp_seconds",
                                  "Unix time a job with a time budget will have ended by (time left: minus time()).",
                                  _JOB, registry=r)
        self.epoch_duration = Histogram("dropfit_epoch_duration_seconds", "Duration of training epochs.",
                                        buckets=EPOCH_BUCKETS, registry=r)
        self.job_duration = Histogram("dropfit_job_duration_seconds", "Duration of jobs that ran, start to end.",
                                      buckets=JOB_BUCKETS, registry=r)
        self.last_success = Gauge("dropfit_last_success_timestamp_seconds",
                                  "Unix time of the last successful job (0: none yet).", registry=r)
        self.invalid_images = Counter("dropfit_invalid_images", "Image files skipped as unreadable or invalid.",
                                      registry=r)
        self.info = Gauge("dropfit_build_info", "dropfit version (always 1).", ["version"], registry=r)
        self.info.labels(version).set(1)
        self.start_time = Gauge("dropfit_start_time_seconds", "Unix time the daemon started.", registry=r)
        self.start_time.set(time.time())
        self._lock = threading.Lock()
        self._expiry: dict[tuple[str, str], float] = {}
        self._predicted: dict[tuple[str, str], int] = {}  # images each prediction job reported so far

    def epoch(self, job_id: str, dataset: str, row: dict) -> None:
        """Record an ``epoch_end`` event of a job."""
        labels = (job_id, dataset)
        if row.get("epoch") is not None:
            self.job_epoch.labels(*labels).set(row["epoch"])
        if row.get("epochs") is not None:
            self.job_epochs_planned.labels(*labels).set(row["epochs"])
        self.job_epochs_done.labels(*labels).inc()
        for split, prefix in (("train", ""), ("validation", "val_")):
            if row.get(prefix + "loss") is not None:
                self.job_loss.labels(*labels, split).set(row[prefix + "loss"])
            if row.get(prefix + "accuracy") is not None:
                self.job_accuracy.labels(*labels, split).set(row[prefix + "accuracy"])
        if row.get("images_per_second") is not None:
            self.job_images_per_second.labels(*labels).set(row["images_per_second"])
        if row.get("seconds") is not None:
            self.epoch_duration.observe(row["seconds"])

    def predicted(self, job_id: str, dataset: str, done: int, images_per_second: float | None) -> None:
        """Record a prediction job's progress: ``done`` images labelled so far (this attempt)."""
        labels = (job_id, dataset)
        with self._lock:
            before = self._predicted.get(labels, 0)
            self._predicted[labels] = done
        self.images_predicted.inc(done - before if done >= before else done)  # a new attempt starts from 0
        self.job_epoch.labels(*labels).set(done)
        if images_per_second is not None:
            self.job_images_per_second.labels(*labels).set(images_per_second)

    def budget(self, job_id: str, dataset: str, seconds: float | None, deadline: float | None) -> None:
        """Record a job's time budget and deadline (from its trainer's `started` event)."""
        if seconds is not None and deadline is not None:
            self.job_time_budget.labels(job_id, dataset).set(seconds)
            self.job_deadline.labels(job_id, dataset).set(deadline)

    def job_started(self, job_id: str, dataset: str, epoch: int, epochs: int | None) -> None:
        with self._lock:
            self._expiry.pop((job_id, dataset), None)
        self.job_epoch.labels(job_id, dataset).set(epoch)
        self.job_epochs_done.labels(job_id, dataset)
        if epochs:
            self.job_epochs_planned.labels(job_id, dataset).set(epochs)

    def job_ended(self, job_id: str, dataset: str, outcome: str, seconds: float | None, retention: float,
                  kind: str | None = None) -> None:
        """Count an outcome and schedule the job's own series for removal after ``retention`` seconds."""
        self.jobs.labels(outcome, str(kind or JobKind.TRAIN)).inc()
        if outcome == "succeeded":
            self.last_success.set(time.time())
        if seconds is not None:
            self.job_duration.observe(seconds)
        with self._lock:
            self._expiry[(job_id, dataset)] = time.monotonic() + retention

    def next_expiry(self) -> float | None:
        with self._lock:
            return min(self._expiry.values(), default=None)

    def expire(self, now: float | None = None) -> None:
        """Drop the series of jobs that ended more than the retention time ago."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = [key for key, at in self._expiry.items() if at <= now]
            for key in due:
                del self._expiry[key]
                self._predicted.pop(key, None)
        for labels in due:
            for gauge in (self.job_epoch, self.job_epochs_planned, self.job_epochs_done, self.job_images_per_second,
                          self.job_time_budget, self.job_deadline):
                _remove(gauge, *labels)
            for gauge in (self.job_loss, self.job_accuracy):
                for split in ("train", "validation"):
                    _remove(gauge, *labels, split)


def _remove(metric, *labels) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class MetricsServer:
    """``/metrics`` (Prometheus text or OpenMetrics, gzip when asked) and ``/healthz`` on one port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, health: Callable[[], dict]):
        base = MetricsHandler.factory(registry)

        class Handler(base):
            def do_GET(self):
                if self.path.split("?", 1)[0] == "/healthz":
                    status = health()
                    body = json.dumps(status).encode()
                    self.send_response(200 if status.get("status") == "ok" else 503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super().do_GET()

            def log_message(self, format, *args):  # one line per scrape would drown the log
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        # shutdown() waits for serve_forever() to acknowledge: called on a server that never started, it would wait
        # forever (a daemon that failed during recovery hung on its way out).
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
