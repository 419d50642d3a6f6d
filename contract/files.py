"""The name of every file the daemon and the trainer exchange, in one place. Both sides import them from here; a file
whose name is spelled anywhere else is one only its own side reads.

In a drop (the job folder)::

    job.yaml, predict.yaml          what the job is (`JOB_FILE`, `PREDICT_FILE`)

In ``outbox/<job-id>/`` — the trainer writes, the daemon reads::

    model.keras, labels.json        the model and its classes (the model catalogue, prediction jobs)
    summary.json                    final metrics (the model catalogue)
    exports.json, <export files>    the checked exports (`EXPORT_FILES`)
    finished.json                   written last: proof for a restarted daemon that the job is done
    train.log                       the trainer's log (its stderr, or written by the trainer itself)

and the daemon writes, for people and tools::

    status.json, error.txt, job.resolved.yaml / predict.resolved.yaml, notifications.jsonl;
    CANCEL (written by people: cancels the job)

In ``state/jobs/<job-id>/``: ``spec.json`` (the resolved spec the trainer runs), ``dataset/``, ``work/`` (checkpoints,
and ``events.jsonl`` for runners that follow the trainer's events through a file).
"""

JOB_FILE = "job.yaml"
PREDICT_FILE = "predict.yaml"

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.json"
DATASET_FILE = "dataset.json"
METRICS_FILE = "metrics.csv"
EXPORTS_FILE = "exports.json"
FINISHED_FILE = "finished.json"
TRAIN_LOG = "train.log"
# Where each export lands (a SavedModel and an OpenVINO IR are folders; the IR is model.xml + model.bin).
EXPORT_FILES = {"savedmodel": "savedmodel", "tflite": "model.tflite", "tflite_int8": "model_int8.tflite",
                "onnx": "model.onnx", "openvino": "openvino"}

STATUS_FILE = "status.json"
ERROR_FILE = "error.txt"
RESOLVED_FILE = "job.resolved.yaml"
RESOLVED_PREDICT_FILE = "predict.resolved.yaml"
NOTIFICATIONS_FILE = "notifications.jsonl"
CANCEL_FILE = "CANCEL"

SPEC_FILE = "spec.json"
DATASET_DIR = "dataset"
WORK_DIR = "work"
EVENTS_FILE = "events.jsonl"
