"""Drive a real daemon process in tests: its own config and folders, real files, real HTTP scrapes."""

from __future__ import annotations

import hashlib
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
from trainer.data.demo import make_shapes

FAKE_TRAINER = [sys.executable, str(ROOT / "tests" / "fake_trainer.py")]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition",
             transient: tuple[type[BaseException], ...] = (), show=None):
    """Poll ``predicate`` until it returns something true, and return that.

    An exception from the predicate ends the wait at once (a broken check must not look like a slow one), unless it
    is one of ``transient``, which the caller names (e.g. a file read while it is being replaced). On timeout the
    error says what the predicate last returned or raised, and ``show()`` if given (the state worth seeing: the job
    table, a log's tail). The predicate is asked once more at the deadline, so a slow machine cannot skip it.
    """
    deadline = time.monotonic() + timeout
    last, error = None, None
    while True:
        try:
            value = predicate()
        except transient as exc:
            last, error = None, exc
        else:
            if value:
                return value
            last, error = value, None
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    seen = f"the check last raised {error!r}" if error is not None else f"the check last returned {last!r}"
    extra = f"\n{show()}" if show is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; {seen}{extra}") from error


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Everything under ``root`` by its path relative to it: a hash of each file's bytes, each link's target text,
    "folder" for a folder (an emptied folder shows too). ``skip``: relative paths left out, with all below them."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if any(rel == s or rel.startswith(s + os.sep) for s in skip):
                continue
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "folder"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


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
        # daemon.json is absent until the daemon is up, and may be read half written: both are only "not yet".
        info = wait_for(self._info, 30, what=f"daemon start (log: {self.log_path})",
                        transient=(FileNotFoundError, json.JSONDecodeError), show=lambda: self.log()[-3000:])
        self.url = info["metrics_url"].rsplit("/", 1)[0]
        return self

    def _info(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        info = json.loads((self.state / "daemon.json").read_text())
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

        return wait_for(done, timeout, interval=0.2, what=f"{n} job(s) in {states}", show=self.describe)

    def describe(self) -> str:
        """The job table as `dropfit status` sees it now, and the daemon log's tail: what a timed-out wait shows."""
        try:
            table = "\n".join(f"  {j['name']!r}: {j['state']}, epoch {j['epoch']}/{j['epochs']}, attempt "
                              f"{j['attempt']}, {j['error'] or ''}" for j in self.jobs()) or "  (no jobs)"
        except AssertionError as exc:  # `dropfit status` itself failed: that is worth seeing too
            table = f"  dropfit status failed: {exc}"
        return f"jobs:\n{table}\ndaemon log (tail):\n{self.log()[-3000:]}"

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
