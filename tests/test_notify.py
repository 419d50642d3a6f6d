"""Webhooks (``notify:``): a real HTTP receiver on 127.0.0.1 gets every event of a job in order, each signed; with
the receiver down the job still finishes and the failed delivery is recorded and counted."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from daemon_harness import DaemonProcess, wait_for

SECRET = "s3cret-for-tests"


class Receiver:
    """A webhook receiver: records (headers, body) of every POST; answers 500 to the first ``fail_first``."""

    def __init__(self, fail_first: int = 0):
        self.requests: list[tuple[dict, bytes]] = []
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.requests.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A path with a token in it, as Slack's and Teams' webhook URLs have: it must never be logged or recorded.
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0KEN-in-the-path"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver(fail_first=1)  # the first delivery fails once: retried, not lost
    yield r
    r.close()


def test_events_arrive_in_order_signed_and_retried(tmp_path, receiver):
    d = DaemonProcess(tmp_path / "d", notify=[{"url": receiver.url, "secret": SECRET, "retries": 3}]).start()
    try:
        d.drop("flowers", {"epochs": 2})
        [job] = d.wait_jobs(1)
        assert job["state"] == "succeeded"
        d.drop("broken", {"epochs": 0})  # rejected at intake: failed
        wait_for(lambda: len(receiver.requests) >= 4, 30, what="4 deliveries")
        events = []
        for headers, body in receiver.requests:
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["X-Dropfit-Signature"], expected)
            data = json.loads(body)
            assert headers["X-Dropfit-Event"] == data["event"]
            events.append((data["job"]["dataset"], data["event"]))
        assert events == [("flowers", "queued"), ("flowers", "started"), ("flowers", "finished"),
                          ("broken", "failed")]
        finished = json.loads(receiver.requests[2][1])["job"]
        assert finished["id"] == job["id"] and finished["state"] == "succeeded" and finished["kind"] == "train"
        log = [json.loads(line) for line in (d.outbox / job["id"] / "notifications.jsonl").read_text().splitlines()]
        assert [e["event"] for e in log] == ["queued", "started", "finished"] and log[0]["attempts"] == 2
        samples = d.scrape()
        assert samples[("dropfit_notifications_total", (("event", "finished"), ("result", "delivered")))] == 1
        assert "T0KEN" not in d.log() and all("T0KEN" not in e["url"] for e in log)
    finally:
        d.stop()


def test_a_receiver_that_is_down_never_holds_a_job_back(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = DaemonProcess(tmp_path / "d", notify=[{"url": f"http://127.0.0.1:{port}/", "events": ["finished"],
                                               "retries": 1, "timeout_seconds": 1}]).start()
    try:
        d.drop("flowers", {"epochs": 2})
        [job] = d.wait_jobs(1)
        assert job["state"] == "succeeded"
        record = d.outbox / job["id"] / "notifications.jsonl"
        entry = wait_for(lambda: record.exists() and json.loads(record.read_text().splitlines()[0]), 30,
                         what="the failed delivery to be recorded")
        assert entry["result"] == "failed" and entry["attempts"] == 2 and entry["event"] == "finished"
        assert "could not deliver finished" in d.log()
        samples = d.scrape()
        assert samples[("dropfit_notifications_total", (("event", "finished"), ("result", "failed")))] == 1
    finally:
        d.stop()


def test_a_receiver_that_accepts_and_never_answers_delays_nothing(tmp_path, receiver):
    """A webhook endpoint that takes the connection and then says nothing (a hung proxy): each delivery to it waits
    its timeout on its own thread. Jobs, the loop, /healthz, another URL's deliveries and the shutdown all go on."""
    import time

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # the kernel completes each connection; nobody ever reads or answers
    try:
        d = DaemonProcess(tmp_path / "d", notify=[
            {"url": f"http://127.0.0.1:{hung.getsockname()[1]}/", "retries": 5, "timeout_seconds": 60},
            {"url": receiver.url, "events": ["finished"]}]).start()
        started = time.monotonic()
        for name in ("one", "two", "three"):
            d.drop(name, {"epochs": 2})
        jobs = d.wait_jobs(3, timeout=60)
        assert [j["state"] for j in jobs] == ["succeeded"] * 3
        assert time.monotonic() - started < 30  # not one webhook timeout (60 s) on the way
        finished = wait_for(lambda: len(receiver.requests) >= 3 and receiver.requests, 30,
                            what="the other URL's deliveries")
        assert sorted(json.loads(body)["job"]["dataset"] for _, body in finished) == ["one", "three", "two"]
        answered = time.monotonic()
        assert d.get("/healthz")[0] == 200 and time.monotonic() - answered < 2
        stopping = time.monotonic()
        assert d.stop(timeout=30) == 0
        assert time.monotonic() - stopping < 15, "the daemon waited for the hung receiver to stop"
        assert "not sent: the daemon stopped" in (d.outbox / jobs[0]["id"] / "notifications.jsonl").read_text()
    finally:
        hung.close()


def test_a_bad_webhook_url_is_a_config_error(tmp_path):
    d = DaemonProcess(tmp_path / "d", notify=[{"url": "ftp://example.invalid/x"}])
    proc = d.cli("status")
    assert proc.returncode == 2 and ("config.yaml:4: notify[0].url: must be an http:// or https:// URL with a host, "
                                     "got 'ftp://example.invalid/x'\n") in proc.stderr
