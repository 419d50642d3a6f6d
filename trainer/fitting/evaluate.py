"""After training: the model users get (`for_inference`), its evaluation on held-out images with the calibration
temperature fitted and built in (`evaluate`), and ``summary.json``'s record of the whole run (`summary`)."""

from __future__ import annotations

import logging
import time

import keras

from contract.options import TrainOptions
from trainer.data.dataset import Dataset
from trainer.data.pipeline import Batches, make_dataset
from trainer.fitting import calibration
from trainer.fitting.phases import Fit, Phase
from trainer.network.backbones import set_backbone_trainable
from trainer.network.layers import FusedBatchNormalization
from trainer.network.networks import Network, build_model
from trainer.outputs import artifacts, results
from trainer.outputs.report import classification_report
from trainer.prediction.api import labels_and_predictions

log = logging.getLogger(__name__)
# A held-out image is a label suspect when the calibrated model gives another class at least this probability.
SUSPECT_CONFIDENCE = 0.9


def for_inference(model, data: Dataset, o: TrainOptions, runtime, phases: list[Phase]) -> keras.Model:
    """The model users get (and model.keras): the same network without the training-only augmentation and fused batch
    normalisation, in float32 and on one device: built-in layers only, so plain keras.models.load_model() reads it
    anywhere, and nothing random at inference. It is left uncompiled: it is for predicting."""
    fused = any(isinstance(layer, FusedBatchNormalization) for layer in model.layers)
    if not (o.augmentation or runtime.precision != "float32" or runtime.replicas > 1 or fused):
        return model
    plain = build_model((*data.target_size, o.channels), len(data.class_names), Network.of(o))
    plain.set_weights(model.get_weights())
    set_backbone_trainable(plain, phases[-1].backbone_trainable, phases[-1].fine_tune_layers)
    return plain


def evaluate(model, data: Dataset, o: TrainOptions) -> tuple[dict, list[dict], keras.Model]:
    """The report on held-out images (test, else validation; training images when none are held out), with the
    temperature fitted on the validation images and built into the returned model (`trainer.fitting.calibration`)."""
    def predictions(samples):
        ds = make_dataset(samples, Batches(len(data.class_names), data.target_size, o.batch_size, o.channels),
                          cache=False, with_index=True)
        return labels_and_predictions(model, ds, with_details=True)

    raw = {name: (samples, *predictions(samples)) for name, samples in (("test", data.test), ("validation", data.val))
           if samples}
    temperature = 1.0
    if "validation" in raw:
        _, y_val, _, p_val, _ = raw["validation"]
        temperature = round(calibration.fit_temperature(p_val, y_val), 4)  # as recorded, so all forms agree
        model = calibration.calibrated(model, temperature)
        log.info("calibration: temperature %.3f fitted on %d validation images", temperature, len(y_val))
    evaluations = {}
    for name, (samples, y_true, y_pred, probs, idx) in raw.items():
        scaled = calibration.scale(probs, temperature)
        evaluations[name] = (classification_report(y_true, y_pred, data.class_names),
                             results.misclassified(samples, y_true, y_pred, scaled, idx, data.class_names),
                             probs, scaled, y_true)
    main_split = next(iter(evaluations), None)
    if main_split is None:
        data.info["warnings"].append("no held-out images (validation_split and test_split are 0): the model "
                                     "was not evaluated or calibrated; the confusion matrix shows training images")
        y_true, y_pred, _, _ = predictions(data.train)
        evaluations["train"] = (classification_report(y_true, y_pred, data.class_names), [], None, None, None)
        main_split = "train"
    report = {"split": main_split, "held_out": main_split != "train", **evaluations[main_split][0],
              "splits": {name: {k: e[0][k] for k in ("accuracy", "macro_f1", "images")}
                         for name, e in evaluations.items()}}
    errors = evaluations[main_split][1]
    report["misclassified"] = errors[:100]
    _, _, before, after, labels = evaluations[main_split]
    report["calibration"] = _calibration(temperature, main_split, before, after, labels) if "validation" in raw \
        else None
    # The images whose given label the calibrated model contradicts most confidently: worth a look.
    report["suspects"] = [e for e in errors if e["probability"] >= SUSPECT_CONFIDENCE][:200]
    return report, errors, model


def _calibration(temperature: float, split: str, before, after, labels) -> dict:
    cal = {"temperature": round(temperature, 4), "fitted_on": "validation", "split": split, "images": len(labels),
           "before": calibration.measures(before, labels), "after": calibration.measures(after, labels),
           "reliability_before": calibration.reliability(before, labels),
           "reliability_after": calibration.reliability(after, labels),
           "coverage": calibration.coverage(after, labels), "suggested": calibration.suggested_threshold(after, labels)}
    if split == "validation":
        cal["note"] = ("measured on the validation images the temperature was fitted on (set test_split for an "
                       "independent measure)")
    return cal


def summary(run, model, fit: Fit, report: dict) -> dict:
    """summary.json: what the run did, with what (every setting, and how each ``auto`` was settled), how long, and
    how well. ``run`` is the `trainer.fitting.train.Run` under way."""
    data, o, resolved, clock = run.data, run.resolved.options, run.resolved, run.clock
    final = fit.rows[-1] if fit.rows else {}
    cal = report.get("calibration")
    plan = resolved.plan
    return {
        "classes": data.class_names, "num_classes": len(data.class_names), "architecture": o.architecture,
        "epochs": sum(p.epochs for p in fit.phases), "epochs_trained": final.get("epoch", 0),
        "stopped_early": fit.stopped_early, "resumed_from": fit.resumed_from,
        "final": {k: final.get(k) for k in artifacts.METRIC_COLUMNS},
        "best_epoch": fit.best.best_epoch if fit.best else None,
        "restored_best_weights": bool(fit.best and fit.best.restored),
        "weight_average": fit.best.averaged if fit.best else None,
        "best_val_accuracy": max((r["val_accuracy"] for r in fit.rows if r.get("val_accuracy") is not None),
                                 default=None),
        "evaluation": {"split": report["split"], "held_out": report["held_out"], "accuracy": report["accuracy"],
                       "macro_f1": report["macro_f1"], "images": report["images"]},
        "evaluations": report["splits"],
        "durations": {"total_seconds": time.time() - run.started, "fit_seconds": fit.seconds,
                      "epoch_seconds": [r.get("seconds") for r in fit.rows]},
        "seed": o.seed,
        "config": {"train_directory": data.scan.root, **o.to_json(), "target_size": list(data.target_size),
                   "requested_target_size": run.requested.to_json()["target_size"],
                   "class_weights": {data.class_names[i]: w for i, w in (fit.class_weights or {}).items()}},
        "resolved": resolved.decisions,
        "parameters": int(model.count_params()),
        "calibration": {k: cal[k] for k in ("temperature", "before", "after", "suggested")} if cal else None,
        "budget": None if plan is None else {
            "seconds": clock.budget, "plan": plan.to_json(),
            "stopped_by": getattr(fit.budget, "stopped_by", None) or ("early stopping" if fit.stopped_early
                                                                      else "epochs"),
            "used_seconds": round(clock.used(), 1)},
        "runtime": {**run.runtime.to_json(), "cache": resolved.cache_mode},
        "versions": artifacts.library_versions(),
        **(run.metadata or {}),
    }


def export_data(data: Dataset, o: TrainOptions):
    """What the exports are checked on (held-out images) and INT8 is calibrated on (training images), decoded
    only when there are exports."""
    def load():
        from trainer.outputs import exports

        # The validation images first: the held-out split nearly every job has, so exports.json means the same thing
        # from job to job.
        held, split = ((data.val, "validation") if data.val else (data.test, "test") if data.test
                       else (data.train, "training (not held out)"))
        channels = 1 if o.color_mode == "grayscale" else 3
        images, labels = exports.load_arrays(held, data.target_size, channels, exports.CHECK_IMAGES, o.seed)
        representative, _ = exports.load_arrays(data.train, data.target_size, channels,
                                                exports.REPRESENTATIVE_IMAGES, o.seed + 1)
        return images, labels, representative, split

    return load

