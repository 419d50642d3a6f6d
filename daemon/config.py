"""The daemon's configuration (``config.yaml``), validated like a job spec: located errors, unknown keys rejected.

Relative paths are taken from the folder of the config file. With no file at all the embedded defaults apply, and
they are exactly what the repository's ``config.yaml`` says: a local daemon on the CPU, folders beside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from contract.spec import JobSpec, SpecError, explain, load_yaml_model

CONFIG_FILE = "config.yaml"
ENV_CONFIG = "DROPFIT_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class MetricsConfig(_Section):
    """Where Prometheus scrapes ``/metrics`` (and health checks hit ``/healthz``)."""

    host: str = Field("127.0.0.1", description="Bind address; loopback unless a container publishes it.")
    port: Annotated[int, Strict(), Field(ge=0, le=65535)] = Field(9464, description="0 picks a free port.")


class ObserverConfig(_Section):
    """How the inbox is watched: inotify events, or polling for bind mounts and network shares without them."""

    kind: Literal["inotify", "polling"] = "inotify"
    interval: Annotated[float, Field(gt=0, le=3600)] = Field(2.0, description="Seconds between polls (polling).")
    rescan_seconds: Annotated[float, Field(gt=0, le=86400)] = Field(
        30.0, description="How often the inbox's top level is looked at in full anyway (one scandir), and the "
                          "watcher checked, so that a drop whose event was lost is still found.")


class LimitsConfig(_Section):
    """What one drop may ask of the daemon: anyone who can write to the inbox can drop anything."""

    max_classes: Annotated[int, Strict(), Field(ge=2)] = Field(
        1000, description="More class folders than this and the job is rejected before it runs.")
    archive_max_bytes: Annotated[int, Strict(), Field(ge=1)] = Field(
        20 << 30, description="A dropped .zip/.tar.gz may extract to at most this many bytes.")
    archive_max_files: Annotated[int, Strict(), Field(ge=1)] = Field(
        200_000, description="... and hold at most this many files.")
    archive_max_ratio: Annotated[float, Field(gt=1)] = Field(
        200.0, description="... at a compression ratio of at most this (decompression bombs).")


class SlurmConfig(_Section):
    """``runner.kind: slurm``: one ``sbatch`` batch job per attempt; folders on storage the nodes share."""

    partition: str | None = Field(None, description="--partition (default: the cluster's default partition).")
    account: str | None = Field(None, description="--account.")
    qos: str | None = Field(None, description="--qos.")
    gpus_per_job: Annotated[int, Strict(), Field(ge=0, le=64)] = Field(
        0, description="GPUs per job (--gres=gpu:N); 0 requests none.")
    multi_gpu_gpus: Annotated[int, Strict(), Field(ge=1, le=64)] | None = Field(
        None, description="GPUs for a job with hardware.multi_gpu (default: gpus_per_job).")
    cpus_per_job: Annotated[int, Strict(), Field(ge=1)] | None = Field(None, description="--cpus-per-task.")
    memory: str | None = Field(None, description="--mem, e.g. 32G.")
    requeue: Annotated[bool, Strict()] = Field(
        True, description="--requeue: Slurm reruns an attempt whose node failed (it resumes from its checkpoint).")
    prologue: str = Field(
        "", description="Shell lines the batch script runs before the trainer (module load, a venv, Apptainer...).")
    extra_args: list[str] = Field(default_factory=list, description="More sbatch options, passed as they are.")
    bin_dir: str | None = Field(None, description="Folder of sbatch, squeue, scontrol, scancel (default: PATH).")


class KubernetesConfig(_Section):
    """``runner.kind: kubernetes``: one batch/v1 Job per attempt through the official client."""

    namespace: str = Field("dropfit", description="Where the trainer Jobs are created.")
    image: str = Field("dropfit:latest", description="The trainer's image (the one compose.yaml builds).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    command: list[str] = Field(default_factory=lambda: ["python", "-m", "trainer"],
                               description="How the image runs the trainer.")
    data_claim: str = Field("dropfit-data", description="ReadWriteMany PVC with the inbox, outbox and state folders.")
    data_mount: str = Field("/data", description="Where the claim is mounted, in the daemon's pod and the trainers'.")
    service_account: str | None = Field(None, description="The trainer pods' service account.")
    gpus_per_job: Annotated[int, Strict(), Field(ge=0, le=64)] = Field(
        1, description="nvidia.com/gpu per job; 0 requests none.")
    multi_gpu_gpus: Annotated[int, Strict(), Field(ge=1, le=64)] | None = Field(
        None, description="GPUs for a job with hardware.multi_gpu (default: gpus_per_job).")
    cpu: str | None = Field(None, description="CPU request, e.g. '4'.")
    memory: str | None = Field(None, description="Memory request and limit, e.g. '16Gi'.")
    queue: str | None = Field(None, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict] = Field(default_factory=list)
    instance: str = Field("default", description="Labels this daemon's Jobs, so two daemons can share a namespace.")
    kubeconfig: str | None = Field(None, description="A kubeconfig file; default: in-cluster, else ~/.kube/config.")
    ttl_seconds_after_finished: Annotated[int, Strict(), Field(ge=60)] | None = Field(
        3600, description="Kubernetes deletes a finished Job and its pods this long after it ended (at least 60 s "
                          "and 3 poll intervals, so the daemon reads the end first); null keeps them.")
    container_error_seconds: Annotated[float, Field(gt=0, le=86400)] = Field(
        300.0, description="How long a trainer pod may fail to start its container (ErrImagePull, ImagePullBackOff, "
                           "CreateContainerConfigError) before the attempt fails; InvalidImageName fails at once.")


class RunnerConfig(_Section):
    """Where trainers run: this host (``local``), a Slurm cluster or a Kubernetes cluster."""

    kind: Literal["local", "slurm", "kubernetes"] = Field(
        "local", description="local: a child process per job; slurm: sbatch; kubernetes: a batch/v1 Job.")
    poll_interval: Annotated[float, Field(gt=0, le=300)] = Field(
        2.0, description="slurm: how often squeue and the trainers' events files are read.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)

    @model_validator(mode="after")
    def _jobs_outlive_a_few_polls(self) -> RunnerConfig:
        # The end of an attempt (its exit code lives in its pod) is read at the next poll: a Job deleted sooner
        # could take it along.
        ttl = self.kubernetes.ttl_seconds_after_finished
        if ttl is not None and ttl < 3 * self.poll_interval:
            raise ValueError(f"kubernetes.ttl_seconds_after_finished ({ttl}) must be at least 3 poll intervals "
                             f"({3 * self.poll_interval:g} s), so the daemon reads how an attempt ended before "
                             "Kubernetes deletes its Job")
        return self


NOTIFY_EVENTS = ("queued", "started", "finished", "failed", "cancelled")


class NotifyConfig(_Section):
    """A webhook: a JSON POST for each job event it asks for, signed with HMAC-SHA256 when it has a secret."""

    url: str = Field(description="http:// or https:// URL the events are POSTed to.")
    events: list[Literal[NOTIFY_EVENTS]] = Field(
        default_factory=lambda: list(NOTIFY_EVENTS), description="Which job events to send (default: all).")
    secret: str | None = Field(None, description="Signs each body: header X-Dropfit-Signature: sha256=<hex HMAC>.")
    secret_env: str | None = Field(None, description="Or: the environment variable holding the secret.")
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = Field(5.0, description="Per delivery attempt.")
    retries: Annotated[int, Strict(), Field(ge=0, le=20)] = Field(
        5, description="Attempts after the first, with exponential backoff (1, 2, 4... s, at most 60 s apart).")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    def signing_key(self) -> bytes | None:
        """The secret, from the config or the environment (an unset variable: unsigned, and the daemon says so)."""
        value = self.secret if self.secret is not None else os.environ.get(self.secret_env or "", None)
        return value.encode() if value else None


class Config(_Section):
    """dropfit daemon configuration."""

    model_config = ConfigDict(extra="forbid", validate_default=True, title="dropfit config.yaml")

    inbox: str = Field("inbox", description="Drop dataset folders (class subfolders + job.yaml) here.")
    outbox: str = Field("outbox", description="Results appear in outbox/<job-id>/.")
    state_dir: str = Field("state", description="Ledger, claimed datasets and checkpoints.")
    archive_dir: str = Field("archive", description="Datasets of succeeded jobs are moved here.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    observer: ObserverConfig = Field(default_factory=ObserverConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    settle_seconds: Annotated[float, Field(ge=0, le=3600)] = Field(
        5.0, description="A dropped folder must be quiet this long before its job starts (copies in progress).")
    max_concurrent_jobs: Annotated[int, Strict(), Field(ge=1, le=10000)] = Field(
        1, description="local: jobs at once (without GPUs); slurm, kubernetes: jobs handed to the engine at once "
                       "(it decides when each runs).")
    gpus: list[str] | Literal["auto"] = Field(
        default_factory=list, description="GPU ids handed out one per job via CUDA_VISIBLE_DEVICES; 'auto' asks "
                                          "nvidia-smi; empty: do not set CUDA_VISIBLE_DEVICES.")
    job_defaults: dict = Field(default_factory=dict, description="Merged under every job.yaml.")
    job_timeout_seconds: Annotated[float, Field(gt=0)] | None = Field(
        86400.0, description="A job running longer is stopped and fails; null for no limit.")
    retries: Annotated[int, Strict(), Field(ge=0, le=100)] = Field(
        1, description="How often a job whose trainer crashed is started again (it resumes from its checkpoint).")
    stop_grace_seconds: Annotated[float, Field(ge=0, le=3600)] = Field(
        30.0, description="After SIGTERM, how long a trainer may take to checkpoint before it is killed.")
    after_success: Literal["archive", "keep", "delete"] = Field(
        "archive", description="What happens to a dataset after its job succeeded. Failed jobs always keep theirs.")
    metrics_retention_seconds: Annotated[float, Field(ge=0)] = Field(
        300.0, description="How long a finished job's per-job series stay in /metrics.")
    trainer_command: list[str] | None = Field(
        None, description="Command that runs the trainer (default: this Python with -m trainer).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    notify: list[NotifyConfig] = Field(default_factory=list, description="Webhooks told of job events.")
    ledger: str | None = Field(
        None, description="The ledger file (default: state_dir/ledger.sqlite3). It must be on a local disk: "
                          "SQLite's locking does not work over NFS.")

    # The folder relative paths are taken from: the config file's, set by `load_config`.
    _base_dir: str = PrivateAttr(default_factory=os.getcwd)

    @field_validator("job_defaults")
    @classmethod
    def _defaults_are_a_valid_spec(cls, value: dict) -> dict:
        # A typo here would break every job; catch it when the daemon starts instead.
        try:
            JobSpec.model_validate(value)
        except ValidationError as exc:
            problems = "; ".join(f"{p.field}: {p.message}" for p in explain(exc, JobSpec))
            raise ValueError(f"not a valid job spec: {problems}") from None
        return value

    def path(self, name: str) -> Path:
        """An absolute folder: ``inbox``, ``outbox``, ``state_dir`` or ``archive_dir``."""
        return (Path(self._base_dir) / getattr(self, name)).resolve()

    def ledger_path(self) -> Path:
        """The ledger file: ``ledger``, else ``state_dir/ledger.sqlite3``."""
        if self.ledger:
            return (Path(self._base_dir) / self.ledger).resolve()
        return self.path("state_dir") / "ledger.sqlite3"

    def trainer_argv(self) -> list[str]:
        return list(self.trainer_command) if self.trainer_command else [sys.executable, "-m", "trainer"]

    def gpu_ids(self) -> list[str]:
        """The GPUs to hand out, one job each; ``auto`` lists them with nvidia-smi (none if it is missing)."""
        if self.gpus != "auto":
            return list(self.gpus)
        smi = shutil.which("nvidia-smi")
        if not smi:
            return []
        try:
            out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [line.strip() for line in out.splitlines() if line.strip()]


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Load the daemon's configuration.

    ``path``, else ``$DROPFIT_CONFIG``, else ``./config.yaml`` if it exists, else the embedded defaults (relative to
    the current folder).

    Raises:
        SpecError: with file, line and field of each problem.
    """
    if path is None:
        path = os.environ.get(ENV_CONFIG) or (CONFIG_FILE if Path(CONFIG_FILE).is_file() else None)
    if path is None:
        return Config()
    config = load_yaml_model(path, Config)
    config._base_dir = str(Path(path).resolve().parent)
    return config


__all__ = ["CONFIG_FILE", "Config", "SpecError", "load_config"]
