"""The Slurm runner: one ``sbatch`` batch job per attempt, followed with ``squeue``/``scontrol`` and the trainer's
own events file, cancelled with ``scancel``. Plain command-line calls (no pyslurm, nothing pickled).

The batch script (kept in ``state/jobs/<id>/slurm/attempt-<n>.sh``) runs the configured prologue and then ``exec``s
the trainer, so Slurm's signals reach the trainer itself: ``--signal=B:TERM@<grace>`` makes it checkpoint before
the time limit, ``scancel --signal=TERM --batch`` is a graceful cancel. ``--requeue`` lets Slurm rerun an attempt
whose node failed; the trainer resumes from its checkpoint in the shared work folder. The folders (and the Python
environment the trainer runs in) must be on storage the nodes share; the ledger stays on the daemon's local disk.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from daemon.config import Config
from daemon.ledger import Job
from daemon.runners.base import Launch, SubmitError
from daemon.runners.remote import EngineError, EngineStatus, RemoteAttempt, RemoteRunner

log = logging.getLogger(__name__)

# squeue's long state names, by what they mean for dropfit.
_PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT",
            "POWER_UP_NODE"}
_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED"}
_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
          "OUT_OF_MEMORY", "REVOKED"}
# sbatch's answers that will not change by trying again (others, e.g. "Unable to contact slurm controller", may).
_PERMANENT = re.compile(r"invalid|not available|rejected|unrecognized|not permitted|no partition|illegal",
                        re.IGNORECASE)


class SlurmRunner(RemoteRunner):
    kind = "slurm"

    def __init__(self, post, config: Config):
        super().__init__(post, config.max_concurrent_jobs, config.runner.poll_interval)
        self.config, self.slurm = config, config.runner.slurm
        self.jobs_dir = config.path("state_dir") / "jobs"

    def describe(self) -> str:
        s = self.slurm
        where = f"partition {s.partition}" if s.partition else "the default partition"
        gpus = f", {s.gpus_per_job} GPU(s) per job" if s.gpus_per_job else ""
        return f"sbatch to {where}{gpus}, up to {self.max_submitted} job(s) in Slurm at once"

    def events_path(self, job: Job) -> Path:
        return self.jobs_dir / job.id / "work" / "events.jsonl"

    # --- commands -----------------------------------------------------------------------------------------------

    def _command(self, name: str) -> str:
        if self.slurm.bin_dir:
            return str(Path(self.slurm.bin_dir) / name)
        return shutil.which(name) or name

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self._command(argv[0]), *argv[1:]], capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EngineError(f"{argv[0]}: {exc}") from None

    # --- submit -------------------------------------------------------------------------------------------------

    def script(self, launch: Launch) -> str:
        """The batch script of one attempt: environment, prologue, then the trainer in the script's place."""
        lines = ["#!/bin/bash",
                 f"# dropfit job {launch.job_id}, attempt {launch.attempt} (written by the dropfit daemon)",
                 *(f"export {key}={shlex.quote(value)}" for key, value in sorted(launch.env.items())),
                 f'echo "===== attempt {launch.attempt}, $(date "+%Y-%m-%d %H:%M:%S"), slurm job $SLURM_JOB_ID on '
                 f'$(hostname)" >&2']
        if self.slurm.prologue.strip():
            lines += ["# prologue (runner.slurm.prologue)", self.slurm.prologue.rstrip()]
        # Events go to the events file the daemon follows; stdout would only repeat them into train.log.
        lines.append(f"exec {shlex.join(launch.argv)} > /dev/null")
        return "\n".join(lines) + "\n"

    def sbatch_args(self, launch: Launch, script: Path) -> list[str]:
        s = self.slurm
        args = ["--parsable", f"--job-name={job_name(launch.job_id, launch.attempt)}", f"--output={launch.log_path}",
                "--open-mode=append", f"--chdir={launch.log_path.parent}"]
        for flag, value in (("--partition", s.partition), ("--account", s.account), ("--qos", s.qos),
                            ("--cpus-per-task", s.cpus_per_job), ("--mem", s.memory)):
            if value is not None:
                args.append(f"{flag}={value}")
        gpus = (s.multi_gpu_gpus or s.gpus_per_job) if launch.multi_gpu else s.gpus_per_job
        if gpus:
            args.append(f"--gres=gpu:{gpus}")
        if launch.timeout:
            # The daemon stops the job at job_timeout_seconds itself; Slurm's limit (whole minutes) is the backstop,
            # and warns the trainer `grace` seconds before it so that it checkpoints first.
            minutes = math.ceil((launch.timeout + launch.grace) / 60) + 1
            args += [f"--time={minutes}", f"--signal=B:TERM@{max(1, int(launch.grace))}"]
        args.append("--requeue" if s.requeue else "--no-requeue")
        return [*args, *s.extra_args, str(script)]

    def _submit(self, launch: Launch) -> tuple[str, dict]:
        folder = self.jobs_dir / launch.job_id / "slurm"
        folder.mkdir(parents=True, exist_ok=True)
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        if launch.events_file is not None:
            launch.events_file.parent.mkdir(parents=True, exist_ok=True)
        script = folder / f"attempt-{launch.attempt}.sh"
        script.write_text(self.script(launch))
        script.chmod(0o755)
        try:
            proc = self._run("sbatch", *self.sbatch_args(launch, script))
        except EngineError as exc:
            raise SubmitError(str(exc)) from None
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout).strip().replace("sbatch: error: ", "") or f"exit {proc.returncode}"
            raise SubmitError(message, permanent=bool(_PERMANENT.search(message)))
        ref = proc.stdout.strip().split(";")[0]
        if not ref.isdigit():
            raise SubmitError(f"sbatch answered {proc.stdout.strip()!r}, not a job id")
        return ref, {"host": None}

    # --- follow -------------------------------------------------------------------------------------------------

    def _statuses(self, attempts: list[RemoteAttempt]) -> dict[str, EngineStatus]:
        refs = [a.ref for a in attempts]
        proc = self._run("squeue", "--noheader", "--states=all", "--jobs=" + ",".join(refs),
                         "--format=%i|%T|%r|%S")
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            raise EngineError((proc.stderr or proc.stdout).strip() or f"squeue exited {proc.returncode}")
        states = {}
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2:
                states[parts[0]] = (*parts[1:4], "", "")[:3]
        out = {}
        for ref in refs:
            if ref not in states:
                # squeue drops an unknown id and, asked for only unknown ones, fails: ask for that one alone.
                info = self.job_info(ref)
                if info is None:
                    continue
                states[ref] = (info.get("JobState", ""), info.get("Reason", ""), info.get("StartTime", ""))
            state, reason, start = states[ref]
            out[ref] = self._status(ref, state, reason, start)
        return out

    def _status(self, ref: str, state: str, reason: str, start: str = "") -> EngineStatus:
        reason = None if reason in ("", "None", "(null)") else reason
        if state in _PENDING:
            return EngineStatus("pending", reason)
        if state in _RUNNING or state not in _ENDED:
            return EngineStatus("running", started_at=_slurm_time(start))
        info = self.job_info(ref) or {}
        status = _exit_status(info.get("ExitCode", ""), state)
        detail = None if state in ("COMPLETED", "FAILED") else f"slurm: {state}"
        return EngineStatus("ended", detail, status=status, timed_out=state == "TIMEOUT",
                            cancelled=state == "CANCELLED")

    def job_info(self, ref: str) -> dict | None:
        """``scontrol show job -o REF`` as a dict, or None once Slurm no longer knows the job."""
        proc = self._run("scontrol", "show", "job", "-o", ref)
        if proc.returncode != 0 or not proc.stdout.strip():
            if "Invalid job id" in proc.stderr or (proc.returncode != 0 and not proc.stderr.strip()):
                return None
            raise EngineError(proc.stderr.strip())
        return parse_oneliner(proc.stdout.splitlines()[0])

    def lookup(self, job: Job) -> str | None:
        """The Slurm job of ``job``'s current attempt, by its name (newest first if somehow there are several)."""
        proc = self._run("squeue", "--noheader", "--states=all", f"--name={job_name(job.id, job.attempt)}",
                         "--format=%i")
        if proc.returncode != 0:
            raise EngineError((proc.stderr or proc.stdout).strip() or f"squeue exited {proc.returncode}")
        refs = sorted((line.strip() for line in proc.stdout.splitlines() if line.strip().isdigit()), key=int)
        return refs[-1] if refs else None

    def cancel(self, attempt: RemoteAttempt, graceful: bool) -> None:
        attempt.cancel_sent = True
        if graceful and attempt.last_state == "running":
            # The batch script exec'd the trainer: TERM to the batch step reaches it, and it checkpoints.
            argv = ("scancel", "--signal=TERM", "--batch", attempt.ref)
        else:
            argv = ("scancel", attempt.ref)
        try:
            proc = self._run(*argv)
        except EngineError as exc:
            log.error("%s failed: %s", " ".join(argv), exc)
            return
        if proc.returncode != 0:
            log.warning("%s: %s", " ".join(argv), proc.stderr.strip())


def job_name(job_id: str, attempt: int) -> str:
    """The Slurm job name of one attempt: derived from the job and the attempt, so that an attempt whose submission
    the ledger did not get to record is found again by it (`SlurmRunner.lookup`)."""
    return f"dropfit-{job_id}-{attempt}"


def _slurm_time(text: str) -> float | None:
    """Slurm's ``2026-12-05T08:45:01`` (local time) as Unix time; None for ``N/A``, ``Unknown`` and the like."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def parse_oneliner(text: str) -> dict[str, str]:
    """One line of ``scontrol show ... -o`` (``Key=Value Key=Value ...``) as a dict."""
    out = {}
    for part in re.split(r" (?=[A-Za-z][A-Za-z0-9_:/]*=)", text.strip()):
        key, _, value = part.partition("=")
        out[key] = value
    return out


def _exit_status(exit_code: str, state: str) -> int:
    """Slurm's ``ExitCode=<status>:<signal>`` as one number: the exit status, or minus the signal."""
    match = re.fullmatch(r"(\d+):(\d+)", exit_code.strip())
    if not match:
        return 0 if state == "COMPLETED" else -9
    status, sig = int(match.group(1)), int(match.group(2))
    if sig:
        return -sig
    if state == "OUT_OF_MEMORY" and status == 0:
        return -9
    return status
