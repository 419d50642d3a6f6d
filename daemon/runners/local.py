"""The local runner: one trainer child process per job on this host (one per GPU when GPUs are configured), its own
session, JSON-lines events from stdout, stderr appended to ``train.log``.

Like watchdog's ``AutoRestartTrick``: the child leads its own process group, so stopping it means signalling the
whole group (SIGTERM, a grace period, then SIGKILL), and nothing it started is left behind. A trainer gets SIGTERM
when its daemon dies (parent-death signal), so none outlives a restart by design; one that does (it ignored the
signal) is stopped at the restart, but only when it is provably ours.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contract.protocol import ENV_JOB_ID, ENV_PARENT_PID, ENV_STATE_DIR
from daemon.ledger import Job
from daemon.messages import Message, TrainerExit, TrainerProtocolMismatch
from daemon.runners.base import Attempt, Launch, Runner
from daemon.runners.events import read_event_line

log = logging.getLogger(__name__)

_MAX_LINE = 1 << 20


class TrainerProcess:
    """Start with `start`; events and the exit status arrive through ``post`` (from a reader thread)."""

    def __init__(self, job_id: str, argv: list[str], env: dict, log_path: Path, post: Callable[[Message], None]):
        self.job_id, self.argv, self.env, self.log_path, self.post = job_id, argv, env, log_path, post
        self.proc: subprocess.Popen | None = None
        self.started_ticks: int | None = None
        self.log = logging.LoggerAdapter(log, {"job_id": job_id})

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, attempt: int) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
            log_file.write(f"===== attempt {attempt}, {stamp}: {' '.join(self.argv)}\n".encode())
            log_file.flush()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=log_file, env=self.env, start_new_session=True, close_fds=True)
        self.started_ticks = process_start_ticks(self.proc.pid)
        threading.Thread(target=self._read, name=f"events-{self.job_id[:24]}", daemon=True).start()
        self.log.info("trainer started, pid %d", self.proc.pid)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        mismatch = False
        with self.proc.stdout:
            while raw := self.proc.stdout.readline(_MAX_LINE):
                message = read_event_line(raw.decode("utf-8", "replace"), self.job_id, "trainer output")
                # Once the trainer is found to speak another protocol it is being stopped: the rest it says is
                # not understood, and one mismatch is enough to report.
                if message is not None and not mismatch:
                    mismatch = isinstance(message, TrainerProtocolMismatch)
                    self.post(message)
        self.post(TrainerExit(self.job_id, self.proc.wait()))

    def signal(self, sig: int) -> None:
        """Signal the trainer's whole process group (no error if it is already gone)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.log.info("sent %s to the trainer", signal.Signals(sig).name)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class LocalAttempt(Attempt):
    proc: TrainerProcess | None = None
    gpu: str | None = None

    def terminate(self) -> None:
        self.proc.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.proc.signal(signal.SIGKILL)


class LocalRunner(Runner):
    """``max_concurrent_jobs`` trainers at once, or one per GPU of ``gpus`` (via ``CUDA_VISIBLE_DEVICES``)."""

    kind = "local"

    def __init__(self, post: Callable[[Message], None], state_dir: Path, gpus: list[str], max_concurrent_jobs: int):
        super().__init__(post)
        self.state_dir = state_dir
        self.gpus, self.free_gpus = list(gpus), list(gpus)
        self.slots = len(gpus) or max_concurrent_jobs
        self.active: dict[str, LocalAttempt] = {}
        self.host = socket.gethostname()

    def describe(self) -> str:
        return f"{self.slots} slot(s)" + (f", GPUs {self.gpus}" if self.gpus else "")

    def can_start(self, multi_gpu: bool) -> bool:
        if not self.gpus:
            return len(self.active) < self.slots
        # A multi-GPU job waits for every GPU (first in, first out: the jobs behind it wait too).
        return len(self.free_gpus) == len(self.gpus) if multi_gpu else bool(self.free_gpus)

    def submit(self, launch: Launch) -> LocalAttempt:
        if launch.multi_gpu and self.gpus:
            gpu = ",".join(self.free_gpus)
            self.free_gpus.clear()
        else:
            gpu = self.free_gpus.pop(0) if self.gpus else None
        env = dict(os.environ, PYTHONUNBUFFERED="1", **launch.env, **{ENV_PARENT_PID: str(os.getpid())})
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        proc = TrainerProcess(launch.job_id, launch.argv, env, launch.log_path, self.post)
        try:
            proc.start(launch.attempt)
        except OSError:
            self.free_gpus.extend(gpu.split(",") if gpu else [])
            raise
        attempt = LocalAttempt(launch.job_id, str(proc.pid), {"pid": proc.pid, "pid_start": proc.started_ticks,
                                                               "host": self.host, "gpu": gpu}, proc, gpu)
        self.active[launch.job_id] = attempt
        return attempt

    def release(self, job_id: str) -> None:
        attempt = self.active.pop(job_id, None)
        if attempt is not None and attempt.gpu is not None:
            self.free_gpus.extend(attempt.gpu.split(","))

    def reattach(self, job: Job, grace: float) -> None:
        """A local trainer never carries on under a new daemon: one left running is stopped (if provably ours) and
        the job runs again from its checkpoint.

        Recovery does not call this: a trainer a previous daemon ran here is stopped whichever runner is configured
        now, so `daemon.recovery` calls `stop_left_over` itself for every job whose engine was local."""
        stop_left_over(job, self.state_dir, grace)
        return None


def stop_left_over(job: Job, state_dir: Path, grace: float) -> None:
    """Stop the local trainer a previous daemon left running for ``job``, if there is one and it is provably ours."""
    jl = logging.LoggerAdapter(log, {"job_id": job.id})
    if not job.pid:
        return
    if job.host != socket.gethostname():
        jl.warning("its trainer (pid %d) was started on host %s, not here; not signalling it", job.pid, job.host)
    elif is_own_trainer(job.pid, job.id, state_dir, job.pid_start):
        jl.warning("stopping trainer pid %d left running by the previous daemon", job.pid)
        stop_orphan(job.pid, grace)
    elif _alive(job.pid):
        jl.warning("pid %d, recorded for its trainer, is not provably that trainer; not signalling it", job.pid)


def trainer_env(job_id: str, state_dir: Path) -> dict:
    """What every trainer finds in its environment: who it belongs to (so a restarted daemon can prove a process is
    its own before it signals it)."""
    return {ENV_JOB_ID: job_id, ENV_STATE_DIR: str(state_dir)}


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22): with the pid, an identity
    that a recycled pid cannot fake."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_own_trainer(pid: int, job_id: str, state_dir: Path, started_ticks: int | None) -> bool:
    """True only if ``pid`` is provably the trainer this state folder started for ``job_id``: the same process
    (start time), with our job id and state folder in its environment. Anything unproven is left alone."""
    if started_ticks is None or process_start_ticks(pid) != started_ticks:
        return False  # (a ledger from before 0.2 recorded no start time: nothing can be proven)
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    want = {f"{ENV_JOB_ID}={job_id}".encode(), f"{ENV_STATE_DIR}={state_dir}".encode()}
    return want <= set(environ)


def stop_orphan(pid: int, grace: float) -> None:
    """Stop a trainer left running by an earlier daemon (the caller has proved it is one): SIGTERM its group, wait
    ``grace`` seconds for its checkpoint, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by init) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
