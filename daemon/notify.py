"""Webhooks (the config's ``notify:``): a JSON POST to each URL for the job events it asked for — queued, started,
finished, failed, cancelled.

Delivery never blocks or fails a job: events go into one queue per URL (so each URL gets them in order), drained by
its own thread, with bounded retries and exponential backoff. A delivery that still fails is logged, counted
(``dropfit_notifications_total{result="failed"}``) and recorded in the job's ``outbox/<id>/notifications.jsonl``
(delivered ones too; URLs appear there and in the log redacted). When the daemon stops, what is still queued gets one
last attempt each for a few seconds; the rest is recorded as not sent (also behind a receiver that never answers,
whose delivery in flight is recorded as unconfirmed). Each body is signed when the URL has a
secret::

    X-Dropfit-Signature: sha256=<hex HMAC-SHA256 of the body with the secret>
    X-Dropfit-Event: finished
    X-Dropfit-Delivery: <unique id, the same on every retry>

Receivers check it with ``hmac.compare_digest(expected, header)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import queue
import secrets
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from contract.files import NOTIFICATIONS_FILE as RECORD_FILE
from contract.protocol import JobKind
from daemon.ledger import Job, JobState

log = logging.getLogger(__name__)

EVENT_OF_STATE = {JobState.QUEUED: "queued", JobState.RUNNING: "started", JobState.SUCCEEDED: "finished",
                  JobState.FAILED: "failed", JobState.CANCELLED: "cancelled"}
QUEUE_SIZE = 10_000  # per URL: a receiver down for days must not grow the daemon's memory without bound
MAX_BACKOFF = 60.0


_END = object()


def redact(url: str) -> str:
    """The URL as logs and the outbox show it: webhook URLs often carry their secret in the path (Slack, Teams,
    Discord), so only the scheme, host and a short hash of the rest."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/...#{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def signature(key: bytes, body: bytes) -> str:
    """The ``X-Dropfit-Signature`` header value for ``body``."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def payload(event: str, job: Job, outbox: Path) -> dict:
    """What a receiver gets: the event, and the job as ``status.json`` describes it (less the noise)."""
    return {"event": event, "time": time.time(), "job": {
        "id": job.id, "dataset": job.name, "kind": str(job.kind or JobKind.TRAIN), "state": job.state.value,
        "attempt": job.attempt, "outcome": job.outcome, "error_kind": job.error_kind, "error": job.error,
        "epoch": job.epoch, "epochs": job.epochs, "images_done": job.images_done, "images_total": job.images_total,
        "best_val_accuracy": job.best_val_accuracy,
        "model_job": job.model_job, "warnings": job.warnings or [], "outbox": str(outbox / job.id)}}


class Notifier:
    """Sends job events to the configured webhooks, from background threads."""

    def __init__(self, targets, outbox: Path, metrics=None):
        self.outbox, self.metrics = outbox, metrics
        self._closing = threading.Event()  # stopping: no more retries
        self._stop = threading.Event()  # stopped: nothing more is sent
        self._record_lock = threading.Lock()
        self._workers = []
        self._inflight: dict[int, tuple] = {}  # worker -> the delivery it is making now (event, job id, delivery)
        for target in targets:
            if target.secret_env and target.signing_key() is None:
                log.warning("notify %s: secret_env %s is not set; its events go unsigned", redact(target.url),
                            target.secret_env)
            q: queue.Queue = queue.Queue(QUEUE_SIZE)
            thread = threading.Thread(target=self._drain, args=(len(self._workers), target, q),
                                      name=f"notify-{len(self._workers)}", daemon=True)
            self._workers.append((target, q, thread))
            thread.start()

    def job_changed(self, job: Job, event: str | None = None) -> None:
        """Queue ``event`` (default: the one of the state ``job`` just entered) for every URL that asked for it;
        never blocks."""
        event = event or EVENT_OF_STATE.get(job.state)
        if event is None or not self._workers:
            return
        body = json.dumps(payload(event, job, self.outbox), ensure_ascii=False).encode()
        delivery = secrets.token_hex(8)
        for target, q, _ in self._workers:
            if event in target.events:
                try:
                    q.put_nowait((event, job.id, delivery, body))
                except queue.Full:
                    self._failed(target, event, job.id, delivery, 0, "the queue for this URL is full")

    def close(self, timeout: float = 3.0) -> None:
        """Stop: what is queued gets one more attempt each (no retries, no backoff) for up to ``timeout`` seconds;
        whatever is left then is logged, counted and recorded as not sent. Never blocks longer than that."""
        self._closing.set()
        for _, q, _thread in self._workers:
            with contextlib.suppress(queue.Full):  # full: the worker ends once it has emptied the queue
                q.put_nowait(_END)
        deadline = time.monotonic() + timeout
        for _, _, thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        for index, (target, q, thread) in enumerate(self._workers):
            thread.join(1.0)
            if thread.is_alive():  # held by a receiver that takes the connection and never answers: left behind
                self._give_up(index, target, q)

    def _give_up(self, index: int, target, q: queue.Queue) -> None:
        """Record what a stuck worker will never send, so that nothing queued is lost without a trace."""
        inflight = self._inflight.pop(index, None)
        if inflight is not None:
            self._failed(target, *inflight, 1, "no answer before the daemon stopped (it may have arrived)")
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                return
            if item is not _END:
                event, job_id, delivery, _ = item
                self._failed(target, event, job_id, delivery, 0, "not sent: the daemon stopped")

    def _drain(self, index: int, target, q: queue.Queue) -> None:
        key = target.signing_key()
        while True:
            try:
                item = q.get(timeout=0.5)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            if item is _END:
                return
            event, job_id, delivery, body = item
            if self._stop.is_set():
                self._failed(target, event, job_id, delivery, 0, "not sent: the daemon stopped")
                continue
            self._inflight[index] = (event, job_id, delivery)
            try:
                self._deliver(target, key, event, job_id, delivery, body)
            finally:
                self._inflight.pop(index, None)

    def _deliver(self, target, key: bytes | None, event: str, job_id: str, delivery: str, body: bytes) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "dropfit", "X-Dropfit-Event": event,
                   "X-Dropfit-Delivery": delivery}
        if key:
            headers["X-Dropfit-Signature"] = signature(key, body)
        error, attempts = "", 0
        for attempt in range(target.retries + 1):
            if attempt and (self._closing.is_set() or self._closing.wait(min(MAX_BACKOFF, 2.0 ** (attempt - 1)))):
                break  # stopping: no more retries
            attempts += 1
            try:
                request = urllib.request.Request(target.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=target.timeout_seconds) as response:
                    response.read(1024)
                self._count(event, "delivered")
                self._record(job_id, {"event": event, "url": redact(target.url), "delivery": delivery,
                                      "result": "delivered", "attempts": attempts})
                return
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} {exc.reason}"
            except (urllib.error.URLError, OSError, ValueError) as exc:
                error = str(getattr(exc, "reason", exc))
        self._failed(target, event, job_id, delivery, attempts, error)

    def _failed(self, target, event: str, job_id: str, delivery: str, attempts: int, error: str) -> None:
        log.warning("notify %s: could not deliver %s of job %s after %d attempt(s): %s", redact(target.url), event,
                    job_id, attempts, error, extra={"job_id": job_id})
        self._count(event, "failed")
        self._record(job_id, {"event": event, "url": redact(target.url), "delivery": delivery, "result": "failed",
                              "attempts": attempts, "error": error})

    def _count(self, event: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.notifications.labels(event, result).inc()

    def _record(self, job_id: str, entry: dict) -> None:
        path = self.outbox / job_id / RECORD_FILE
        try:
            with self._record_lock, open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")
        except OSError as exc:
            log.warning("could not record a notification in %s: %s", path, exc.strerror or exc)
