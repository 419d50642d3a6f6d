"""Drive a real daemon process in tests: its own config and folders, real files, real HTTP scrapes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, env_for_subprocess
from trainer.demo import make_shapes

FAKE_TRAINER = [sys.executable, str(ROOT / "tests" / "fake_trainer.py")]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class DaemonProcess:
    """A daemon in a fresh interpreter, on folders under ``root``."""

    def __init__(self, root: Path, env: dict | None = None, **config):
        self.root = root
        self.env = env or {}  # more environment for the daemon (e.g. SLURM_CONF)
        root.mkdir(parents=True, exist_ok=True)
        self.config = {"settle_seconds": 0.5, "metrics": {"port": 0}, "trainer_command": FAKE_TRAINER,
                       "stop_grace_seconds": 10, **config}
        (root / "config.yaml").write_text(yaml.safe_dump(self.config))
        self.inbox, self.outbox = root / "inbox", root / "outbox"
        self.state, self.archive = root / "state", root / "archive"
        self.proc: subprocess.Popen | None = None
        self.log_path = root / "daemon.log"
        self.cwd = root / "cwd"
        self.url = ""

    def start(self) -> DaemonProcess:
        (self.state / "daemon.json").unlink(missing_ok=True)
        log = self.log_path.open("a")
        argv = [sys.executable, "-m", "daemon", "serve", "--config", str(self.root / "config.yaml")]
        # Its own working directory: a daemon that ever resolved a path against "." must not touch the repository
        # (a restart once ran shutil.rmtree(".")); tests look there for what it must leave alone.
        self.cwd.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     env={**env_for_subprocess(), **self.env}, cwd=self.cwd)
        log.close()
        info = wait_for(self._info, 30, what=f"daemon start (log: {self.log_path})")
        self.url = info["metrics_url"].rsplit("/", 1)[0]
        return self

    def _info(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            info = json.loads((self.state / "daemon.json").read_text())
        except (OSError, ValueError):
            return None
        return info if info["pid"] == self.proc.pid else None

    def log(self) -> str:
        if not self.log_path.exists():
            return "(no daemon.log: not started as a process)"
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    # --- dropping datasets -----------------------------------------------------------------------------------

    def drop(self, name: str, spec: dict | None = None, fake: dict | None = None, classes: int = 2,
             per_class: int = 2, **kw) -> Path:
        """Build a dataset outside the inbox and move it in with one rename, as `mv` does."""
        staging = self.root / "staging" / name
        shutil.rmtree(staging, ignore_errors=True)
        make_shapes(staging, classes=classes, per_class=per_class, size_range=kw.pop("size_range", (16, 24)),
                    job=spec if spec is not None else {"epochs": 3}, **kw)
        if fake is not None:
            (staging / "fake.json").write_text(json.dumps(fake))
        self.inbox.mkdir(parents=True, exist_ok=True)
        os.rename(staging, self.inbox / name)
        return self.inbox / name

    # --- looking at results ----------------------------------------------------------------------------------

    def cli(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        """``dropfit ARGS --config <this daemon's config>`` in a fresh interpreter."""
        argv = [sys.executable, "-m", "daemon", *map(str, args), "--config", str(self.root / "config.yaml")]
        return subprocess.run(argv, capture_output=True, text=True, env={**env_for_subprocess(), **self.env},
                              cwd=ROOT, timeout=timeout)

    def jobs(self) -> list[dict]:
        proc = self.cli("status", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def status(self, job_id: str) -> dict:
        return json.loads((self.outbox / job_id / "status.json").read_text())

    def wait_jobs(self, n: int, states=("succeeded", "failed", "cancelled"), timeout: float = 60) -> list[dict]:
        def done():
            jobs = self.jobs()
            return jobs if len(jobs) >= n and all(j["state"] in states for j in jobs[:n]) else None

        return wait_for(done, timeout, interval=0.2, what=f"{n} job(s) in {states}\n{self.log()[-3000:]}")

    def runs(self, job_id: str) -> list[dict]:
        path = self.outbox / job_id / "fake_runs.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def scrape(self) -> dict[tuple, float]:
        """All samples of a real /metrics scrape, parsed by prometheus_client's parser: {(name, labels): value}."""
        status, text = self.get("/metrics")
        assert status == 200
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples
