"""A stand-in for ``python -m trainer`` that speaks the same command line and JSON-lines protocol, instantly.

Behaviour comes from an optional ``fake.json`` in the job folder:

    {"sleep": 0.05,            seconds per epoch
     "crash_attempts": 1,      the first N attempts die by signal at ``crash_epoch``
     "crash_epoch": 2, "crash_signal": "SIGKILL",
     "exit_code": 1,           exit with this code at ``crash_epoch`` (instead of a signal), with an error event
     "hang": true,             never finish (for timeouts)
     "garbage": true}          print lines that are not JSON

Epochs come from job.yaml. It resumes from ``--work`` like the real trainer and logs each invocation to
``OUT/fake_runs.jsonl`` so tests can count runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml

stop = False


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "time": time.time(), "v": 1, **fields}), flush=True)


def on_term(signum, frame):
    global stop
    stop = True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("job_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--work")
    parser.add_argument("--job-id")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    if os.environ.get("DROPFIT_PARENT_PID") and sys.platform.startswith("linux"):
        # Like the real trainer: SIGTERM (stop at a safe point) when the daemon dies.
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
        if str(os.getppid()) != os.environ["DROPFIT_PARENT_PID"]:
            return 75
    job, out, work = Path(args.job_dir), Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    behaviour = json.loads((job / "fake.json").read_text()) if (job / "fake.json").exists() else {}
    spec = yaml.safe_load((job / "job.yaml").read_text()) or {}
    epochs = spec.get("epochs", 3)
    attempts_file = work / "attempts"
    attempt = int(attempts_file.read_text()) + 1 if attempts_file.exists() else 1
    attempts_file.write_text(str(attempt))
    progress = work / "progress.json"
    done = json.loads(progress.read_text())["epoch"] if progress.exists() else 0
    with (out / "fake_runs.jsonl").open("a") as f:
        f.write(json.dumps({"job": args.job_id, "attempt": attempt, "resumed_from": done, "pid": os.getpid(),
                            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "time": time.time()}) + "\n")
    print(f"fake trainer for {args.job_id}, attempt {attempt}", file=sys.stderr)
    emit("started", job=args.job_id, classes=["a", "b"], epochs=epochs, resumed_from=done, skipped=2,
         train_images=10, val_images=2)
    if behaviour.get("garbage"):
        print("this is not json", flush=True)
        print("[1, 2, 3]", flush=True)
    for epoch in range(done + 1, epochs + 1):
        end = time.time() + behaviour.get("sleep", 0.05)
        while time.time() < end or behaviour.get("hang"):
            if stop:
                emit("interrupted", job=args.job_id, completed_epochs=epoch - 1)
                return 75
            time.sleep(0.01)
        if epoch == behaviour.get("crash_epoch") and attempt <= behaviour.get("crash_attempts", 99):
            if "exit_code" in behaviour:
                emit("error", job=args.job_id, kind="internal", message="simulated failure")
                return behaviour["exit_code"]
            os.kill(os.getpid(), getattr(signal, behaviour.get("crash_signal", "SIGKILL")))
        progress.write_text(json.dumps({"epoch": epoch}))
        emit("epoch_end", job=args.job_id, epoch=epoch, epochs=epochs, loss=1.0 / epoch, accuracy=0.5 + epoch / 100,
             val_loss=1.2 / epoch, val_accuracy=0.4 + epoch / 100, learning_rate=0.001, seconds=0.05,
             images_per_second=200.0)
    (out / "model.keras").write_bytes(b"fake model")
    (out / "finished.json.tmp").write_text(json.dumps({"job": args.job_id, "epochs_trained": epochs}))
    os.replace(out / "finished.json.tmp", out / "finished.json")
    with (out / "fake_finished.jsonl").open("a") as f:
        f.write(json.dumps({"job": args.job_id, "attempt": attempt}) + "\n")
    emit("finished", job=args.job_id, artifacts={"model": str(out / "model.keras")}, epochs_trained=epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
