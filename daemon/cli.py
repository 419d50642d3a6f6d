"""``dropfit``: the daemon (``serve``), its jobs (``status``, ``models``, ``cancel``, ``demo``), and the trainer's
commands.

The trainer's commands (``run``, ``train``, ``predict``, ``evaluate``, ``schema``) are ``python -m trainer`` itself
(exec'd in this process' place); nothing here imports the trainer, only the `contract` package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import subprocess
import sys
import time

from contract.protocol import JobKind
from contract.spec import SpecError
from daemon.config import load_config

TRAINER_COMMANDS = ("run", "train", "predict", "evaluate", "schema")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = "-"
        return True


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr once, at the entry point; job lines carry their job id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_JobIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(job_id)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("watchdog").setLevel(logging.WARNING)


def _config(args):
    try:
        return load_config(args.config)
    except SpecError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_serve(args) -> int:
    config = _config(args)
    setup_logging(config.log_level)
    from daemon.service import Daemon, StartupError

    try:
        return Daemon(config).run()
    except StartupError as exc:
        logging.getLogger("daemon").error("cannot start: %s", exc)
        return EXIT_USAGE
    except Exception:
        # Never hang or limp on after a failure outside the loop (which guards itself): say why, and exit.
        logging.getLogger("daemon").exception("the daemon failed")
        return EXIT_FAILED


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@contextlib.contextmanager
def _open_ledger(path):
    """The ledger, read-only (the running daemon owns it), closed afterwards."""
    from daemon.ledger import Ledger

    ledger = Ledger(path, readonly=True)
    try:
        yield ledger
    finally:
        ledger.close()


def _unreadable(path, exc: Exception) -> str:
    return (f"the ledger {path} is unreadable ({exc}); starting the daemon moves it aside and rebuilds it from the "
            "outbox")


def _state(job) -> str:
    """The job's state as users read it: a job waiting in a cluster engine is "pending in slurm", not "running"."""
    if job.state.value == "running" and job.engine not in (None, "local") and job.engine_state in ("pending",
                                                                                                  "submitted"):
        return f"pending in {job.engine}"
    return job.state.value


def cmd_status(args) -> int:
    config = _config(args)
    path = config.ledger_path()
    if not path.exists():
        print("no jobs yet" if not args.json else "[]")
        return EXIT_OK
    try:
        with _open_ledger(path) as ledger:
            jobs = ledger.jobs()
    except sqlite3.DatabaseError as exc:
        print(f"error: {_unreadable(path, exc)}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps([j.to_json() for j in jobs], indent=2))
        return EXIT_OK
    if not jobs:
        print("no jobs yet")
        return EXIT_OK
    now = time.time()
    print(f"{'JOB ID':<48} {'STATE':<20} {'PROGRESS':>9} {'BEST VAL ACC':>13} {'AGE':>6}  DETAIL")
    for j in jobs:
        done, total = j.progress
        progress = f"{done}/{total}" if total else "-"
        best = f"{j.best_val_accuracy:.4f}" if j.best_val_accuracy is not None else "-"
        detail = (j.error or "").splitlines()[0][:80] if j.error else ""
        if j.kind == JobKind.PREDICT:
            progress = f"{done}/{total}img" if total else "-"
            detail = f"predict with {j.model_job}" + (f"; {detail}" if detail else "")
        if j.state.value == "running" and j.engine not in (None, "local"):
            detail = f"{j.engine} job {j.engine_ref}" + (f"; {detail}" if detail else "")
        if j.deadline is not None and not j.state.terminal:
            from contract.duration import format_duration

            left = f"{format_duration(max(0.0, j.deadline - now))} left of {format_duration(j.time_budget or 0)}"
            detail = left + (f"; {detail}" if detail else "")
        print(f"{j.id:<48} {_state(j):<20} {progress:>9} {best:>13} {_age(now - j.created_at):>6}  {detail}")
    return EXIT_OK


def cmd_models(args) -> int:
    """The trained models (succeeded training jobs whose model is still in the outbox): what predict.yaml's
    ``model:`` refers to."""
    from daemon import models

    config = _config(args)
    path = config.ledger_path()
    found = []
    if path.exists():
        try:
            with _open_ledger(path) as ledger:
                found = models.entries(ledger, config.path("outbox"))
        except sqlite3.DatabaseError as exc:
            print(f"error: {_unreadable(path, exc)}", file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(found, indent=2) if args.json else models.table(found))
    return EXIT_OK


def cmd_cancel(args) -> int:
    from contract.atomic import write_text
    from contract.files import CANCEL_FILE

    config = _config(args)
    path = config.ledger_path()
    job = None
    if path.exists():
        try:
            with _open_ledger(path) as ledger:
                job = ledger.get(args.job_id)
        except sqlite3.DatabaseError as exc:
            print(f"error: {_unreadable(path, exc)}", file=sys.stderr)
            return EXIT_FAILED
    if job is None:
        print(f"no job with id {args.job_id!r} (see `dropfit status`)", file=sys.stderr)
        return EXIT_FAILED
    if job.state.terminal:
        print(f"job {job.id} already ended: {job.state.value}", file=sys.stderr)
        return EXIT_FAILED
    if job.state.value == "claiming":
        print(f"job {job.id} is still being taken in (claiming); cancel it once it is queued", file=sys.stderr)
        return EXIT_FAILED
    write_text(config.path("outbox") / job.id / CANCEL_FILE, f"cancel requested at {time.ctime()}\n")
    print(f"cancel requested for {job.id} ({job.state.value})")
    return EXIT_OK


def cmd_validate(args) -> int:
    """Check a job folder as the daemon of this config would take it in, and print the spec it would run."""
    from pathlib import Path

    import yaml

    from contract.files import JOB_FILE, PREDICT_FILE
    from contract.predict_spec import PredictRun
    from contract.spec import resolved_yaml
    from daemon.intake import validate
    from daemon.unpack import archive_kind

    config = _config(args)
    path = Path(args.path)
    if path.is_file() and archive_kind(path.name):
        print(f"{path}: validate checks a job folder; extract the archive and validate the folder "
              "(the daemon takes the archive itself as it is)", file=sys.stderr)
        return EXIT_USAGE
    folder = path.parent if path.name in (JOB_FILE, PREDICT_FILE) and not path.is_dir() else path
    spec, error = validate(folder, config.job_defaults, max_classes=config.limits.max_classes,
                           models=lambda ref: _find_model(config, ref))
    if error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    if isinstance(spec, PredictRun):
        print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
        return EXIT_OK
    print(resolved_yaml(spec, f"{folder / JOB_FILE}"), end="")
    return EXIT_OK


def _find_model(config, ref: str):
    from daemon import models

    path = config.ledger_path()
    if not path.exists():
        raise LookupError(f"no trained model yet (got {ref!r}); drop a dataset with a job.yaml first")
    try:
        with _open_ledger(path) as ledger:
            return models.resolve(ref, ledger, config.path("outbox"))
    except sqlite3.DatabaseError as exc:
        raise LookupError(f"cannot look it up: the ledger {path} is unreadable ({exc})") from None


def cmd_health(args) -> int:
    """Exit 0 if the daemon of this config answers /healthz with 200 (the container's HEALTHCHECK)."""
    import urllib.error
    import urllib.request

    from daemon.service import DAEMON_FILE

    config = _config(args)
    host = config.metrics.host if config.metrics.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://{host}:{config.metrics.port}/healthz"
    try:  # the running daemon says where it listens (metrics.port: 0 picks a port when it starts)
        info = json.loads((config.path("state_dir") / DAEMON_FILE).read_text())
        url = info["metrics_url"].rsplit("/", 1)[0].replace("//0.0.0.0:", "//127.0.0.1:") + "/healthz"
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(body)
    return EXIT_OK


def cmd_demo(args) -> int:
    config = _config(args)
    inbox = config.path("inbox")
    inbox.mkdir(parents=True, exist_ok=True)
    name = args.name or f"demo-shapes-{time.strftime('%H%M%S')}"
    # Built under a hidden name, then renamed: the daemon sees one complete folder appear. Made by the trainer's
    # own command line (the daemon's side never imports the trainer).
    tmp = inbox / f".dropfit-demo-{secrets.token_hex(4)}"
    proc = subprocess.run([sys.executable, "-m", "trainer", "demo", str(tmp), "--seed", str(args.seed)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"dropfit demo: the trainer could not write the demo dataset:\n{proc.stderr.strip()}", file=sys.stderr)
        return EXIT_FAILED
    os.rename(tmp, inbox / name)
    print(f"dropped {inbox / name}; watch it with `dropfit status`, results in {config.path('outbox')}/")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dropfit", description="Drop a folder of class-sorted images into the inbox, get a trained CNN back.",
        epilog=f"Trainer commands ({', '.join(TRAINER_COMMANDS)}): `dropfit COMMAND --help`.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, func, help_text in (("serve", cmd_serve, "run the daemon (watch the inbox, train, serve metrics)"),
                                  ("status", cmd_status, "list jobs: state, progress, best validation accuracy"),
                                  ("models", cmd_models, "list the trained models a predict.yaml can use"),
                                  ("cancel", cmd_cancel, "cancel a queued or running job"),
                                  ("demo", cmd_demo, "drop a small generated dataset into the inbox"),
                                  ("validate", cmd_validate, "check a job folder as this daemon would, and print the "
                                                             "resolved spec (job_defaults and defaults filled in)"),
                                  ("health", cmd_health, "check the running daemon's /healthz (exit 0 if healthy)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="config.yaml (default: $DROPFIT_CONFIG, ./config.yaml, built-in defaults)")
        p.set_defaults(func=func)
        if name in ("status", "models"):
            p.add_argument("--json", action="store_true")
        elif name == "cancel":
            p.add_argument("job_id")
        elif name == "demo":
            p.add_argument("--name", help="folder name in the inbox")
            p.add_argument("--seed", type=int, default=0)
        elif name == "validate":
            p.add_argument("path", help="a job folder (or its job.yaml or predict.yaml)")
    for name in TRAINER_COMMANDS:
        sub.add_parser(name, help=f"trainer: see `dropfit {name} --help`", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TRAINER_COMMANDS:
        # The trainer's own command line, in this process' place: `dropfit train ...` is `python -m trainer train ...`.
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "trainer", *argv])
    args = build_parser().parse_args(argv)
    return args.func(args)
