"""``python -m trainer`` (also ``dropfit``): run a job, train from a terminal, predict, evaluate.

Exit codes: 0 success; 2 invalid job spec or unusable data; 75 stopped on request (SIGTERM/SIGINT) at a safe point,
resumable by running again with the same ``--work``; 1 any other failure.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from contract.options import TrainOptions
from contract.protocol import ExitCode

log = logging.getLogger("trainer.cli")


class _JobFilter(logging.Filter):
    def __init__(self, job_id: str):
        super().__init__()
        self.job_id = job_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = self.job_id
        return True


def setup_logging(job_id: str = "-", level: int = logging.INFO, log_file: str | None = None) -> None:
    """Log to stderr (and ``log_file``), every line tagged with the job id; quiet TensorFlow's C++ and absl chatter."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace"))
    root = logging.getLogger()
    root.handlers[:] = handlers
    for handler in handlers:
        handler.addFilter(_JobFilter(job_id))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(job_id)s] %(name)s: %(message)s"))
    root.setLevel(level)
    for noisy in ("absl", "tensorflow", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _quiet_tensorflow() -> None:
    # Must happen before TensorFlow is imported: it reads these once.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Lines TensorFlow's C++ side prints while starting on a machine without a GPU; they alarm users and mean nothing.
_STARTUP_NOISE = ("All log messages before absl::InitializeLog", "cudart_stub.cc", "cuda_platform.cc",
                  "cpu_feature_guard.cc", "To enable the following instructions", "cuda_executor.cc",
                  "Unable to register cu", "computation_placer.cc", "oneDNN custom operations are on")


def _import_tensorflow() -> None:
    """Import TensorFlow and look for devices with file descriptor 2 captured, passing on all but known noise."""
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                if line.strip() and not any(noise in line for noise in _STARTUP_NOISE):
                    print(line, file=sys.stderr)


# --- run: what the daemon launches -------------------------------------------------------------------------------

def cmd_run(args) -> int:
    started_at = time.monotonic()  # a time budget counts from here: TensorFlow's import is part of the job
    from contract.files import JOB_FILE, PREDICT_FILE
    from contract.predict_spec import read_run
    from contract.protocol import write_finished
    from contract.spec import Problem, SpecError, load_spec, resolve_path
    from trainer.events import EventStream

    _die_with_parent()
    job_dir = Path(args.job_dir)
    job_id = args.job_id or job_dir.resolve().name
    setup_logging(job_id, log_file=args.log_file)
    events = EventStream.claim_stdout(job_id, args.events_file)
    try:
        # Under the daemon, the spec it validated at intake (job_defaults merged); job.yaml is not read again.
        run = read_run(args.spec) if args.spec else None
        if run is None and not args.spec and not (job_dir / JOB_FILE).exists() and (job_dir / PREDICT_FILE).exists():
            raise SpecError(str(job_dir / PREDICT_FILE), [Problem("model", (
                "a prediction job runs under the daemon, which resolves model: to a trained job; from a terminal "
                "use: python -m trainer predict MODEL_DIR IMAGES..."))])
        if run is not None:
            images = resolve_path(job_dir, run.spec.images, "images")
        else:
            spec = load_spec(args.spec if args.spec else job_dir / JOB_FILE)
            paths = {field: resolve_path(job_dir, rel, field) for field, rel in spec.paths().items()}
    except SpecError as exc:
        log.error("invalid job spec:\n%s", exc)
        events.emit("error", kind="spec", message=str(exc))
        return ExitCode.INVALID

    _import_tensorflow()
    stop = threading.Event()
    _install_stop_handlers(stop)

    def daemon_gone() -> None:
        if not stop.is_set():
            log.warning("event stream closed (the daemon is gone): stopping after the current batch")
            stop.set()

    events.on_closed = daemon_gone

    def on_event(event: str, payload: dict) -> None:
        if event == "finished":
            # Written before the event: if the daemon dies before it hears of the success, the marker tells its
            # next start that this job is done, so it is not run a second time.
            write_finished(args.out, job_id, payload.get("epochs_trained", 0))
        events.emit(event, payload)
    if run is not None:
        return _run_prediction(run, images, args.out, job_id, events, on_event, stop)
    log.info("job %s: training on %s, output in %s", job_id, paths["data.train"], args.out)
    try:
        from trainer.data.scan import DatasetError
        from trainer.fitting.train import TrainingInterrupted, train_cnn
        from trainer.outputs.exports import ExportError

        options = TrainOptions.from_spec(spec, paths)
        train_cnn(paths["data.train"], options=options, verbose=0, output_dir=args.out, work_dir=args.work,
                  on_event=on_event, stop_event=stop, started_at=started_at,
                  metadata={"job_id": job_id, "job_dir": str(job_dir.resolve()),
                            "spec": spec.model_dump(mode="json")})
    except TrainingInterrupted as exc:
        log.warning("%s", exc)
        events.emit("interrupted", completed_epochs=exc.completed_epochs, message=str(exc))
        return ExitCode.INTERRUPTED
    except DatasetError as exc:
        log.error("unusable data: %s", exc)
        events.emit("error", kind="data", message=str(exc))
        return ExitCode.INVALID
    except ExportError as exc:  # running it again converts the same model the same way: not retried
        log.error("%s", exc)
        events.emit("error", kind="export", message=str(exc))
        return ExitCode.FAILED
    except BaseException as exc:
        return _failed(events, exc)
    return ExitCode.OK


def _run_prediction(run, images: Path, out, job_id: str, events, on_event, stop) -> int:
    """A prediction job (`trainer.prediction.drop`), with the same exit codes and events as training."""
    from trainer.data.scan import DatasetError
    from trainer.prediction.drop import PredictionRejected, PredictionStopped, run_prediction

    log.info("job %s: labelling %s with the model of %s, output in %s", job_id, images, run.model_job, out)
    try:
        run_prediction(images, run, out, emit=on_event, stop_event=stop, job_id=job_id)
    except PredictionStopped as exc:
        log.warning("%s", exc)
        events.emit("interrupted", completed_epochs=0, message=str(exc))
        return ExitCode.INTERRUPTED
    except (DatasetError, PredictionRejected) as exc:
        kind = "data" if isinstance(exc, DatasetError) else "spec"
        log.error("%s", exc)
        events.emit("error", kind=kind, message=str(exc))
        return ExitCode.INVALID
    except BaseException as exc:
        return _failed(events, exc)
    return ExitCode.OK


def _failed(events, exc: BaseException) -> int:
    """Whatever breaks (out of memory, disk full, a bug), the daemon must get an event with a readable reason."""
    kind, message = _classify(exc)
    log.error("job failed (%s): %s\n%s", kind, message, traceback.format_exc())
    events.emit("error", kind=kind, message=message)
    return ExitCode.FAILED


def _classify(exc: BaseException) -> tuple[str, str]:
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "ResourceExhaustedError":
        return "oom", f"out of memory: {exc or name} (try a smaller batch_size or target_size)"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "io", f"no space left on device: {exc.filename or exc}"
    if isinstance(exc, OSError):
        return "io", f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    if isinstance(exc, KeyboardInterrupt):
        return "internal", "interrupted from the keyboard"
    return "internal", f"{name}: {exc}"


def _die_with_parent() -> None:
    """Under the daemon: get SIGTERM (checkpoint and stop) if the daemon dies, rather than train on as an orphan."""
    parent = os.environ.get("DROPFIT_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:  # the daemon died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _install_stop_handlers(stop: threading.Event) -> None:
    """First SIGTERM/SIGINT: stop at the next safe point; a second one: exit at once.

    Only signals from someone count: a stop asked for otherwise (the event pipe closing when the daemon dies) and the
    parent-death SIGTERMs, one per exiting daemon thread, must not turn into a "second" one that skips the checkpoint.
    """
    received: list[float] = []
    busy: list[bool] = []
    parent = os.environ.get("DROPFIT_PARENT_PID")

    def handler(signum, frame):
        # A signal can run this handler again inside itself; the inner one returning at once keeps it out of
        # Event.set(), whose lock is not re-entrant (a nested set() would hang the trainer for good).
        if busy:
            return
        busy.append(True)
        try:
            _on_signal(signum)
        finally:
            busy.clear()

    def _on_signal(signum):
        name = signal.Signals(signum).name
        # The parent-death signal comes once each time the trainer is handed to another thread of the dying daemon:
        # several within microseconds. They are one request to checkpoint and stop, never a "second" one.
        if (parent and str(os.getppid()) != parent) or (received and time.monotonic() - received[0] < 1.0):
            if not stop.is_set():
                stop.set()
                log.warning("%s: the daemon is gone, stopping after the current batch", name)
            return
        if received:
            log.error("second %s: exiting now", name)
            os._exit(128 + signum)
        received.append(time.monotonic())
        stop.set()
        log.warning("%s received: stopping after the current batch", name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# --- train: the recipe's two lines from a terminal ---------------------------------------------------------------

def cmd_train(args) -> int:
    """Train from a terminal with a progress bar: job.yaml's defaults, overridden by --spec FILE and the options."""
    from contract.spec import SpecError, deep_merge, load_spec, parse_yaml_model

    setup_logging(Path(args.data_dir).name)
    overrides = _train_overrides(args)
    try:
        base = load_spec(args.spec).model_dump(mode="json") if args.spec else {}
        spec = parse_yaml_model(json.dumps(deep_merge(base, overrides)), _job_spec_class(), "command-line options")
    except SpecError as exc:
        print(f"error:\n{exc}", file=sys.stderr)
        return ExitCode.INVALID
    _import_tensorflow()
    from trainer.data.scan import DatasetError
    from trainer.fitting.train import TrainingInterrupted, train_cnn

    out = args.out or Path("runs") / f"{Path(args.data_dir).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    stop = threading.Event()
    _install_stop_handlers(stop)
    try:
        # Paths come from the command line (relative to the current folder), never from a --spec file.
        options = TrainOptions.from_spec(spec).replace(validation_directory=args.validation_dir,
                                               test_directory=args.test_dir, labels_csv=args.labels_csv)
        model = train_cnn(args.data_dir, options=options, verbose=1, output_dir=out, work_dir=args.work,
                          stop_event=stop, metadata={"spec": spec.model_dump(mode="json")})
    except TrainingInterrupted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    summary = json.loads((Path(out) / "summary.json").read_text())
    print(f"\nclasses: {', '.join(model.class_names)}")
    ev = summary["evaluation"]
    split = {"train": "training (not held out)"}.get(ev["split"], ev["split"])
    print(f"{split} accuracy: {ev['accuracy']:.4f} on {ev['images']} images")
    print(f"report: {Path(out) / 'report.html'}")
    print(f"artifacts: {out}")
    return ExitCode.OK


def _job_spec_class():
    from contract.spec import JobSpec

    return JobSpec


def _train_overrides(args) -> dict:
    """Only the options given on the command line, shaped like a job.yaml."""
    spec: dict = {}

    def put(path: str, value) -> None:
        if value is None:
            return
        node = spec
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    if args.target_size:
        size = args.target_size
        put("target_size", "auto" if size == ["auto"] else [int(v) for v in (size * 2)[:2]])
    for path, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("data.classes", args.classes),
                        ("data.validation_split", args.validation_split), ("data.test_split", args.test_split),
                        ("color_mode", args.color_mode), ("seed", args.seed), ("model.architecture", args.architecture),
                        ("model.weights", args.weights), ("optimizer.name", args.optimizer),
                        ("optimizer.learning_rate", args.learning_rate), ("exports", args.export)):
        put(path, value)
    if args.no_augmentation:
        put("augmentation.enabled", False)
    return spec


# --- predict / evaluate ------------------------------------------------------------------------------------------

def _expand(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
        else:
            out.append(p)
    return out


def cmd_predict(args) -> int:
    setup_logging("predict", logging.WARNING)
    _import_tensorflow()
    from trainer.prediction.api import load_model, predict

    try:
        model = load_model(args.model_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    try:
        results = predict(model, _expand(args.images), top_k=args.top_k, min_confidence=args.min_confidence)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['file']}\tERROR\t{r['error']}")
            else:
                ranked = "  ".join(f"{t['label']}:{t['probability']:.3f}" for t in r["top_k"])
                label = r["label"] + (f" (best guess {r['best']})" if "best" in r else "")
                print(f"{r['file']}\t{label}\t{r['probability']:.4f}" + (f"\t{ranked}" if args.top_k > 1 else ""))
    return ExitCode.FAILED if any("error" in r for r in results) else ExitCode.OK


def cmd_evaluate(args) -> int:
    setup_logging("evaluate", logging.WARNING)
    _import_tensorflow()
    from trainer.data.scan import DatasetError
    from trainer.prediction.api import evaluate, load_model

    try:
        report = evaluate(load_model(args.model_dir), args.data_dir, batch_size=args.batch_size)
    except (FileNotFoundError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.INVALID
    if args.json:
        print(json.dumps(report, indent=2))
        return ExitCode.OK
    print(f"accuracy: {report['accuracy']:.4f} on {report['images']} images")
    print(f"{'class':<24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for name, m in report["per_class"].items():
        print(f"{name:<24}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1']:>10.3f}{m['support']:>10d}")
    return ExitCode.OK


# --- small helpers -----------------------------------------------------------------------------------------------

def cmd_validate(args) -> int:
    from contract.files import JOB_FILE
    from contract.spec import SpecError, load_spec

    path = Path(args.path)
    try:
        spec = load_spec(path / JOB_FILE if path.is_dir() else path)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return ExitCode.INVALID
    print(json.dumps(spec.model_dump(mode="json"), indent=2))
    return ExitCode.OK


def cmd_schema(args) -> int:
    if args.which == "predict":
        from contract.predict_spec import json_schema
    else:
        from contract.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return ExitCode.OK


def cmd_demo(args) -> int:
    from trainer.data.demo import make_demo

    root = make_demo(args.directory, seed=args.seed)
    print(root)
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    from contract.protocol import add_run_arguments
    from contract.spec import ARCHITECTURES, COLOR_MODES, EXPORT_FORMATS, OPTIMIZERS

    parser = argparse.ArgumentParser(prog="dropfit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = add_run_arguments(sub.add_parser("run", help="run a job folder (job.yaml + images); JSON-lines events on "
                                                     "stdout"))
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train on a class-per-folder dataset, with a progress bar",
                       description="Train with job.yaml's defaults; --spec and the options override them.")
    p.add_argument("data_dir")
    p.add_argument("--spec", help="a job.yaml to take the settings from (paths in it are ignored)")
    p.add_argument("--target-size", nargs="+", metavar="PX", help="auto, or height [width] (default auto)")
    p.add_argument("--architecture", choices=ARCHITECTURES)
    p.add_argument("--weights", help="backbone weights: imagenet or a .weights.h5 file")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--classes", nargs="+")
    p.add_argument("--validation-split", type=float)
    p.add_argument("--test-split", type=float)
    p.add_argument("--validation-dir")
    p.add_argument("--test-dir")
    p.add_argument("--labels-csv")
    p.add_argument("--color-mode", choices=COLOR_MODES)
    p.add_argument("--seed", type=int)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--no-augmentation", action="store_true")
    p.add_argument("--export", nargs="+", choices=EXPORT_FORMATS)
    p.add_argument("--out", help="output folder (default runs/<dataset>-<time>)")
    p.add_argument("--work", help="work folder for checkpoints (resumable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict the class of images (files or folders)")
    p.add_argument("model_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--min-confidence", metavar="T", help="below this calibrated probability the answer is 'unknown'; "
                                                         "'suggested': the threshold labels.json records")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="accuracy and per-class report on a labelled folder")
    p.add_argument("model_dir")
    p.add_argument("data_dir")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("validate", help="check a job.yaml (or job folder) and print the resolved spec")
    p.add_argument("path")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of job.yaml (or of predict.yaml)")
    p.add_argument("which", nargs="?", choices=("job", "predict"), default="job")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("demo", help="write a small generated dataset with a job.yaml")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_tensorflow()
    args = build_parser().parse_args(argv)
    if getattr(args, "top_k", 1) < 1:
        build_parser().error("--top-k must be a positive integer")
    return args.func(args)
