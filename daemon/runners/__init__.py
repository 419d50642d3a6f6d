"""Where trainers run: see `daemon.runners.base`. The Slurm and Kubernetes runners are imported only when configured
(the Kubernetes one needs the optional ``dropfit[kubernetes]`` extra)."""

from __future__ import annotations

from collections.abc import Callable

from daemon.config import Config
from daemon.messages import Message
from daemon.runners.base import Runner


def make_runner(config: Config, post: Callable[[Message], None]) -> Runner:
    """The runner ``config.runner.kind`` names, posting what it sees to ``post``."""
    kind = config.runner.kind
    if kind == "slurm":
        from daemon.runners.slurm import SlurmRunner

        return SlurmRunner(post, config)
    if kind == "kubernetes":
        from daemon.runners.kubernetes import KubernetesRunner

        return KubernetesRunner(post, config)
    from daemon.runners.local import LocalRunner

    return LocalRunner(post, config.path("state_dir"), config.gpu_ids(), config.max_concurrent_jobs)
