"""`train_cnn`: scan a class-per-folder dataset, build the input pipeline and the network, train, write the results.

The steps, in order: `trainer.data.dataset.load` (scan, audit, split), `trainer.fitting.resolve` (everything left on
``auto``: by the data, and under a ``time_budget`` by measurement), the pipelines (tf.data, cached), the network and
its phases, `trainer.fitting.phases.fit` (phase by phase, resumable from ``work_dir``, on the budget's schedule), and
`trainer.fitting.evaluate` (the model users get, held-out evaluation with calibration, the summary); then
`trainer.outputs.results.write_all` writes the artifacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras

from contract.options import TrainOptions
from trainer.data import dataset
from trainer.data.dataset import Dataset
from trainer.data.pipeline import Batches, DecodeFailures, make_dataset
from trainer.data.scan import DatasetError, shuffled
from trainer.fitting import budget, contender, mirror
from trainer.fitting.advise import advise
from trainer.fitting.callbacks import EventHook, TrainingInterrupted
from trainer.fitting.evaluate import evaluate, export_data, for_inference, summary
from trainer.fitting.hardware import Runtime, configure
from trainer.fitting.phases import Fit, Fitting, Phase, fit
from trainer.fitting.resolve import Resolved, mirrors, resolve
from trainer.network.backbones import has_backbone
from trainer.network.networks import Network, build_model
from trainer.outputs import results

log = logging.getLogger(__name__)

__all__ = ["Call", "TrainOptions", "TrainingInterrupted", "train_cnn"]


@dataclass
class Call:
    """How `train_cnn` is called, besides how to train: where results go, who hears of progress, how to stop it."""

    callbacks: Sequence | None = None  # extra keras.callbacks.Callback objects for fit
    output_dir: str | Path | None = None  # every artifact is written here (see trainer.outputs.results)
    work_dir: str | Path | None = None  # training state is backed up here each epoch; a rerun resumes from it
    on_event: EventHook | None = None  # on_event(name, payload) for started, epoch_end and finished
    stop_event: threading.Event | None = None  # when set, training stops at the next batch: TrainingInterrupted
    metadata: dict | None = None  # extra JSON-ready fields for summary.json (the command line records the spec)
    started_at: float | None = None  # time.monotonic() when the run really began, for time_budget; default now


@dataclass
class Run:
    """One training run under way: what was asked, how each ``auto`` was settled, the data, the devices, the clock."""

    requested: TrainOptions
    call: Call
    data: Dataset
    runtime: Runtime
    clock: budget.Clock | None
    resolved: Resolved | None = None
    started: float = field(default_factory=time.time)
    trained_at: float | None = None  # the budget clock when training (every network tried) ended
    export_floor: float = 0.0  # seconds exporting a tried backbone would take: the job's own plan keeps at least that

    @property
    def metadata(self) -> dict | None:
        return self.call.metadata


def train_cnn(train_directory, target_size=(200, 200), classes=None, batch_size=32, num_epochs=20, num_classes=None,
              verbose=0, **kwargs) -> keras.Model:
    """Train an image classifier on a folder with one subfolder of images per class.

    The classic two lines still work, and with no other arguments train the classic network::

        model = train_cnn("data/train", target_size=(200, 200), num_epochs=20)
        probabilities = model.predict(raw_pixels)   # raw 0-255 pixels: rescaling is inside the model

    Expected layout (hidden files and folders are ignored; class folders are searched recursively)::

        train_directory/
        ├── class_a/
        │   ├── a_001.jpg
        │   └── a_002.png
        └── class_b/
            └── b_001.webp

    Args:
        train_directory: dataset root with one subfolder per class (or the image folder for ``labels_csv``).
        target_size, classes, batch_size, num_epochs, num_classes: the recipe's; see `TrainOptions`.
        verbose: Keras ``fit`` verbosity (0 silent, 1 progress bar, 2 one line per epoch).
        **kwargs: any field of `contract.options.TrainOptions` (how to train: every one is documented there, e.g.
            ``architecture="cnn", time_budget=900, exports=["onnx"]``) or of `Call` (``output_dir``, ``work_dir``,
            ``callbacks``, ``on_event``, ``stop_event``, ``metadata``, ``started_at``); or ``options=`` a whole
            `TrainOptions` (what a job.yaml gives), with the recipe's arguments left at their defaults.

    Returns:
        The trained ``keras.Model``. ``model.class_names`` lists the class of each output, in order.

    Raises:
        ValueError: for invalid arguments, and `trainer.data.scan.DatasetError` (a ``ValueError``) for unusable data.
        TrainingInterrupted: when ``stop_event`` was set.
    """
    call = Call(**{name: kwargs.pop(name) for name in list(kwargs) if name in Call.__dataclass_fields__})
    options = _options(kwargs.pop("options", None), (target_size, classes, batch_size, num_epochs, num_classes),
                       kwargs)
    _check_call(options, verbose, call)
    return _train(train_directory, options, call, verbose)


def _train(train_directory, options: TrainOptions, call: Call, verbose) -> keras.Model:
    emit = call.on_event or (lambda name, payload: None)
    work = Path(call.work_dir) if call.work_dir is not None else None
    out = Path(call.output_dir) if call.output_dir is not None else None
    clock = budget.Clock.start(options.time_budget, call.started_at, work) if options.time_budget else None
    started = time.time()
    run = Run(options, call, dataset.load(train_directory, options), None, clock, started=started)
    keras.utils.set_random_seed(options.seed)
    run.runtime = configure(options.precision, options.jit_compile, options.multi_gpu)
    failures = DecodeFailures(run.data.scan.root)
    trial = contender.Trial.of(options, run.data, clock, work)
    with _cache_folder(work, options.cache) as cache_folder:
        rival = _fit_rival(run, trial, cache_folder, failures) if trial.tried else None
        trained = _fit_network(run, options, clock, cache_folder, failures,
                               _Sink(work, out, emit, verbose, score=rival is not None))
        if rival is not None:
            trial.record(options.architecture, trained.scores or {"accuracy": 0.0, "loss": float("inf")},
                         trained.done.rows[-1]["epoch"] if trained.done.rows else 0, trained.done.seconds)
            if trial.rival_wins():  # exported as the job asked (the backbone trained with no exports of its own)
                rival.resolved.options = rival.resolved.options.replace(exports=options.exports)
                trained = rival
    run.trained_at = clock.used() if clock is not None else None
    run.resolved, run.data.target_size = trained.resolved, trained.target_size
    o, done, phases = trained.resolved.options, trained.done, trained.phases
    model = for_inference(trained.model, run.data, o, run.runtime, phases)
    model, mirroring = mirror.choose(model, run.data, o)
    if failures.items:
        run.data.info["skipped"].extend({"file": s.path, "reason": s.reason} for s in failures.items)
    advice = advise(model, run.data, o)  # before calibration wraps the network's last layer
    report, errors, model = evaluate(model, run.data, o)
    model.class_names = list(run.data.class_names)
    record = summary(run, model, done, report)
    record["advisor"], record["pretrained"] = advice, trial.to_json()
    record["test_time_mirroring"] = mirroring
    paths = _write(run, model, record, (done, report, errors))
    if clock is not None:
        clock.save(work)
        log.info("time budget: %.0f of %.0f s used", clock.used(), clock.budget)
    emit("finished", {"artifacts": {k: str(v) for k, v in paths.items()}, "final": record["final"],
                      "warnings": record.get("warnings", []), "epochs_trained": record["epochs_trained"],
                      "best_val_accuracy": record["best_val_accuracy"], "evaluation": record["evaluation"],
                      "seconds": record["durations"]["total_seconds"]})
    return model


@dataclass
class _Sink:
    """Where one network's training reports: its work folder, the output folder, the events, Keras' verbosity."""

    work: Path | None
    out: Path | None
    emit: EventHook
    verbose: int | str = 0
    score: bool = False  # score the trained network on the validation images (for the pretrained trial)


@dataclass
class _Trained:
    """One network trained: the model, how training went, its settled settings and input size, and its validation
    scores (for the pretrained trial)."""

    model: keras.Model
    done: Fit
    phases: list[Phase]
    resolved: Resolved
    target_size: tuple[int, int]
    scores: dict | None = None


def _fit_network(run: Run, options: TrainOptions, clock, cache_folder, failures, sink: _Sink) -> _Trained:
    """Settle ``options``' ``auto`` settings, build the pipelines and the network, and train it."""
    resolved = resolve(options, run.data, run.runtime, clock, cache_folder, run.export_floor)
    run.resolved = resolved
    o = resolved.options
    train_ds, val_ds = _pipelines(run.data, resolved, failures)
    model, phases = _build(run.data, o, run.runtime)
    call = run.call
    done = fit(Fitting(model, phases, train_ds, val_ds, run.data, o, run.runtime, work_dir=sink.work,
                       output_dir=sink.out, emit=sink.emit, stop_event=call.stop_event,
                       callbacks=call.callbacks or (), verbose=sink.verbose, clock=clock, plan=resolved.plan))
    scores = None
    if sink.score and val_ds is not None:  # only a trial compares: its pass is time the budget does not reserve
        scores = model.evaluate(val_ds, verbose=0, return_dict=True)
        scores = {"accuracy": float(scores["accuracy"]), "loss": float(scores["loss"])}
    return _Trained(model, done, phases, resolved, tuple(run.data.target_size), scores)


def _fit_rival(run: Run, trial: contender.Trial, cache_folder, failures) -> _Trained | None:
    """Train the pretrained backbone on its share of the budget, in its own work folder; its events stay quiet (the
    job's progress is its own network's). None when its weights cannot be used: the job goes on from scratch."""
    folder = contender.rival_folder(Path(run.call.work_dir) if run.call.work_dir is not None else None)
    clock = trial.rival_clock(run.clock, Path(run.call.work_dir) if run.call.work_dir is not None else None)
    options = trial.rival_options(run.requested)
    log.info("pretrained backbone: trying %s (weights %s) before the job's own network", options.architecture,
             trial.weights)
    try:
        quiet = _Sink(folder, None, lambda *_: None, score=True)
        rival = _fit_network(run, options, clock, cache_folder, failures, quiet)
    except DatasetError as exc:  # the weights file is not MobileNetV3Small's (build_backbone names it)
        trial.failed(exc)
        keras.backend.clear_session()
        keras.utils.set_random_seed(run.requested.seed)
        return None
    trial.record(f"{options.architecture} (ImageNet)", rival.scores or {"accuracy": 0.0, "loss": float("inf")},
                 rival.done.rows[-1]["epoch"] if rival.done.rows else 0, rival.done.seconds)
    if rival.resolved.plan is not None:  # if it wins, it is what the job exports, in the time the job's plan keeps
        run.export_floor = budget.export_seconds(run.requested.exports, rival.model,
                                                 rival.resolved.plan.images_per_second,
                                                 1 + mirrors(rival.resolved.options))
    keras.utils.set_random_seed(run.requested.seed)
    return rival


def _write(run: Run, model, record: dict, outcome) -> dict:
    """Every artifact into the output folder (if any), with the job's final time stamped into the summary."""
    def stamp(summary: dict) -> None:
        summary["durations"]["total_seconds"] = time.time() - run.started
        if run.clock is not None:  # what the plan's reserve was for, against what it took
            summary["budget"]["used_seconds"] = round(run.clock.used(), 1)
            summary["budget"]["after_training_seconds"] = round(run.clock.used() - run.trained_at, 1)

    if run.call.output_dir is None:
        stamp(record)
        return {}
    done, report, errors = outcome
    o, data = run.resolved.options, run.data
    return results.write_all(Path(run.call.output_dir), model,
                             results.Outcome(data.class_names, data.target_size, o.color_mode, done.rows, report,
                                             errors, data.info, record),
                             o.exports, export_data=export_data(data, o), stamp=stamp)


def _options(options: TrainOptions | None, recipe_args: tuple, kwargs: dict) -> TrainOptions:
    if options is None:
        names = ("target_size", "classes", "batch_size", "num_epochs", "num_classes")
        try:
            return TrainOptions(**dict(zip(names, recipe_args, strict=True)), **kwargs)
        except TypeError as exc:
            raise TypeError(str(exc).replace("TrainOptions.__init__()", "train_cnn()")) from None
    if kwargs or recipe_args != ((200, 200), None, 32, 20, None):
        raise ValueError("train_cnn takes either options= or individual training arguments, not both. "
                         f"Received: options and {sorted(kwargs) or 'positional arguments'}")
    return options


def _check_call(options: TrainOptions, verbose, call: Call) -> None:
    """The arguments `TrainOptions` cannot check: they are about this call, not about how to train."""
    if verbose not in (0, 1, 2, "auto"):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto'. Received: verbose={verbose!r}")
    if call.callbacks is not None and not all(isinstance(c, keras.callbacks.Callback) for c in call.callbacks):
        raise ValueError("callbacks must be a list of keras.callbacks.Callback. "
                         f"Received: callbacks={call.callbacks!r}")
    if not isinstance(options.optimizer, (str, keras.optimizers.Optimizer)):
        raise ValueError(f"optimizer must be a name or a keras optimizer. Received: optimizer={options.optimizer!r}")
    if options.exports and call.output_dir is None:
        raise ValueError("exports need an output_dir to write to")


@contextlib.contextmanager
def _cache_folder(work_dir: Path | None, cache: str) -> Iterator[Path | None]:
    """Where a disk cache may go: the work folder, or a temporary folder removed however training ends."""
    if work_dir is not None:
        yield work_dir / "cache"
    elif cache in ("auto", "disk"):
        with tempfile.TemporaryDirectory(prefix="dropfit-cache-") as scratch:
            yield Path(scratch)
    else:
        yield None


def _pipelines(data: Dataset, r: Resolved, failures: DecodeFailures):
    o = r.options
    batches = Batches(len(data.class_names), data.target_size, o.batch_size, o.channels)

    def pipeline(samples, name, shuffle=False):
        where = {"memory": True, "none": False}.get(r.cache_mode) or str(Path(r.cache_dir) / name)
        return make_dataset(shuffled(samples, o.seed) if shuffle else samples, batches,
                            shuffle_seed=o.seed if shuffle else None, cache=where, failures=failures)

    return pipeline(data.train, "train", shuffle=True), pipeline(data.val, "val") if data.val else None


def _build(data: Dataset, o: TrainOptions, runtime: Runtime) -> tuple[keras.Model, list[Phase]]:
    with runtime.building():
        network = dataclasses.replace(Network.of(o, o.augmentation), fused_norm=runtime.fused_norm)
        model = build_model((*data.target_size, o.channels), len(data.class_names), network)
    pretrained = has_backbone(model) and o.weights is not None
    phases = [Phase("train" if not pretrained else "head", o.num_epochs, o.learning_rate, not pretrained)]
    if pretrained and o.fine_tune_epochs:
        phases.append(Phase("fine_tune", o.fine_tune_epochs, o.fine_tune_learning_rate, True, o.fine_tune_layers))
    return model, phases
