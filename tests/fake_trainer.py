"""A stand-in for ``python -m trainer`` that speaks the same command line and event protocol (`contract.protocol`,
imported from the same place as the real trainer), instantly and without TensorFlow.

Behaviour comes from an optional ``fake.json`` in the job folder:

    {"sleep": 0.05,            seconds per epoch
     "crash_attempts": 1,      the first N attempts die by signal at ``crash_epoch``
     "crash_epoch": 2, "crash_signal": "SIGKILL",
     "exit_code": 1,           exit with this code at ``crash_epoch`` (instead of a signal), with an error event
     "error_kind": "internal", the kind of that error event
     "hang": true,             never finish (for timeouts)
     "hold_after_epoch": 1,    after this epoch (0: right after "started"), wait until a file named RELEASE is in
                               its output folder: a state the test can look at for as long as it needs
     "ignore_sigterm": true,   ignore SIGTERM (and the parent-death SIGTERM): only SIGKILL stops it
     "stop_seconds": 2,        after SIGTERM, take this long to write the checkpoint before stopping
     "read_all": true,         open and read every file of the dataset first, as the real trainer's scan does
     "protocol": 1,            speak this protocol version instead of the current one
     "warnings": ["..."],      warnings about the data, in the started event
     "garbage": true}          print lines that are not JSON

Epochs come from the resolved spec (``--spec``), else from job.yaml. It resumes from ``--work`` like the real trainer
and logs each invocation to ``OUT/fake_runs.jsonl`` so tests can count runs.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.protocol import (
    ENV_PARENT_PID,
    EVENT_TYPES,
    ExitCode,
    add_run_arguments,
    event_line,
    write_finished,
)

stop = False
version = None
events_file = None


def emit(event: str, **fields) -> None:
    record = EVENT_TYPES[event](**fields)
    if version is not None:
        record.v = version
    line = event_line(record)
    print(line, flush=True)
    if events_file is not None:
        with open(events_file, "a") as f:
            f.write(line + "\n")


class Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
            stream.flush()

    def flush(self):
        for stream in self.streams:
            stream.flush()


def write_atomically(path: Path, text: str) -> None:
    """Like the real trainer's checkpoints: a SIGKILL (an evicted pod) never leaves a half-written file behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def on_term(signum, frame):
    global stop
    stop = True


def main() -> int:
    global version, events_file
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run"])
    args = add_run_arguments(parser).parse_args()
    job, out, work = Path(args.job_dir), Path(args.out), Path(args.work)
    behaviour = json.loads((job / "fake.json").read_text()) if (job / "fake.json").exists() else {}
    version, events_file = behaviour.get("protocol"), args.events_file
    signal.signal(signal.SIGTERM, signal.SIG_IGN if behaviour.get("ignore_sigterm") else on_term)
    if os.environ.get(ENV_PARENT_PID) and sys.platform.startswith("linux"):
        # Like the real trainer: SIGTERM (stop at a safe point) when the daemon dies.
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
        if str(os.getppid()) != os.environ[ENV_PARENT_PID]:
            return ExitCode.INTERRUPTED
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.spec:
        spec = json.loads(Path(args.spec).read_text())
    else:
        spec = yaml.safe_load((job / "job.yaml").read_text()) or {}
    epochs = spec.get("epochs", 3)
    attempts_file = work / "attempts"
    attempt = int(attempts_file.read_text()) + 1 if attempts_file.exists() else 1
    write_atomically(attempts_file, str(attempt))
    progress = work / "progress.json"
    done = json.loads(progress.read_text())["epoch"] if progress.exists() else 0
    with (out / "fake_runs.jsonl").open("a") as f:
        f.write(json.dumps({"job": args.job_id, "attempt": attempt, "resumed_from": done, "pid": os.getpid(),
                            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "spec": args.spec,
                            "time": time.time()}) + "\n")
    if args.log_file:  # like the real trainer's log handler: its lines go to that file too
        sys.stderr = Tee(sys.stderr, open(args.log_file, "a"))  # noqa: SIM115 - for the process' life
    print(f"fake trainer for {args.job_id}, attempt {attempt}", file=sys.stderr)
    if behaviour.get("read_all"):
        files = 0
        for dirpath, _dirs, names in os.walk(job):
            for name in names:
                with open(os.path.join(dirpath, name), "rb") as f:
                    f.read()
                files += 1
        print(f"read {files} files", file=sys.stderr)
    budget = spec.get("time_budget")
    emit("started", job=args.job_id, classes=["a", "b"], epochs=epochs, resumed_from=done, skipped=2,
         train_images=10, val_images=2, warnings=behaviour.get("warnings", []), time_budget=budget,
         deadline=time.time() + budget if budget else None)
    if behaviour.get("garbage"):
        print("this is not json", flush=True)
        print("[1, 2, 3]", flush=True)
    for epoch in range(done + 1, epochs + 1):
        end = time.time() + behaviour.get("sleep", 0.05)
        held = behaviour.get("hold_after_epoch") == epoch - 1 and not (out / "RELEASE").exists()
        while time.time() < end or behaviour.get("hang") or held:
            held = held and not (out / "RELEASE").exists()
            if stop:
                time.sleep(behaviour.get("stop_seconds", 0))
                print(f"stopped on request after {epoch - 1} epoch(s)", file=sys.stderr)
                emit("interrupted", job=args.job_id, completed_epochs=epoch - 1)
                return ExitCode.INTERRUPTED
            time.sleep(0.01)
        if epoch == behaviour.get("crash_epoch") and attempt <= behaviour.get("crash_attempts", 99):
            if "exit_code" in behaviour:
                emit("error", job=args.job_id, kind=behaviour.get("error_kind", "internal"),
                     message="simulated failure")
                return behaviour["exit_code"]
            os.kill(os.getpid(), getattr(signal, behaviour.get("crash_signal", "SIGKILL")))
        write_atomically(progress, json.dumps({"epoch": epoch}))
        emit("epoch_end", job=args.job_id, epoch=epoch, epochs=epochs, loss=1.0 / epoch, accuracy=0.5 + epoch / 100,
             val_loss=1.2 / epoch, val_accuracy=0.4 + epoch / 100, learning_rate=0.001, seconds=0.05,
             images_per_second=200.0)
    (out / "model.keras").write_bytes(b"fake model")
    write_finished(out, args.job_id, epochs)
    with (out / "fake_finished.jsonl").open("a") as f:
        f.write(json.dumps({"job": args.job_id, "attempt": attempt}) + "\n")
    emit("finished", job=args.job_id, artifacts={"model": str(out / "model.keras")}, epochs_trained=epochs)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
