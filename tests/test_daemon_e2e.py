"""The daemon with the real trainer: dataset in, usable model out; and a kill -9 of the daemon mid-training."""

from __future__ import annotations

import csv
import json
import os
import signal

import pytest

from daemon_harness import DaemonProcess, wait_for
from trainer.prediction.api import predict

ARTIFACTS = ["model.keras", "labels.json", "metrics.csv", "history.png", "confusion_matrix.png", "errors.png",
             "report.json", "report.html", "dataset.json", "summary.json", "status.json", "train.log"]


@pytest.fixture
def real_daemon(tmp_path):
    d = DaemonProcess(tmp_path / "d", trainer_command=None, stop_grace_seconds=30)
    yield d
    d.stop(signal.SIGKILL)


def test_real_training_from_drop_to_a_model_that_predicts(real_daemon):
    d = real_daemon.start()
    d.drop("shapes", {"target_size": 32, "epochs": 4, "batch_size": 8}, classes=3, per_class=16,
           size_range=(28, 56), formats=("png", "jpeg", "bmp"))
    [job] = d.wait_jobs(1, timeout=300)
    assert job["state"] == "succeeded", d.log()[-3000:]
    out = d.outbox / job["id"]
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    assert json.loads((out / "labels.json").read_text())["classes"] == ["circle", "square", "triangle"]
    images = sorted((d.archive / job["id"] / "square").iterdir())[:3]
    results = predict(out, images, top_k=2)
    assert all(r["label"] in ("circle", "square", "triangle") and len(r["top_k"]) == 2 for r in results)
    samples = d.scrape()
    assert samples[("dropfit_jobs_total", (("kind", "train"), ("outcome", "succeeded")))] == 1
    assert samples[("dropfit_epoch_duration_seconds_count", ())] == 4
    assert samples[("dropfit_job_epoch", (("dataset", "shapes"), ("job_id", job["id"])))] == 4


def test_kill_9_of_the_daemon_mid_training_then_restart_resumes_the_job(real_daemon):
    d = real_daemon.start()
    d.drop("resume-me", {"target_size": 24, "epochs": 40, "batch_size": 4, "model": {"architecture": "recipe"},
                         "augmentation": {"enabled": False},
                         "training": {"early_stopping_patience": None, "reduce_lr_patience": None}},
           per_class=10, size_range=(20, 30))
    job = wait_for(lambda: (j := d.jobs()) and j[0]["epoch"] >= 2 and j[0], 300, interval=0.1, what="epoch 2")
    trainer_pid = job["pid"]
    d.kill9()
    # The trainer notices its parent died (PR_SET_PDEATHSIG), checkpoints and exits instead of training on.
    wait_for(lambda: not _alive(trainer_pid), 60, what="the orphaned trainer to stop")
    assert "stopping after the current batch" in (d.outbox / job["id"] / "train.log").read_text()
    d.start()
    [job] = d.wait_jobs(1, timeout=300)
    assert job["state"] == "succeeded" and job["attempt"] == 2, d.log()[-3000:]
    out = d.outbox / job["id"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] >= 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 41))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting to be reaped by init is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_job_defaults_from_the_config_are_what_the_real_trainer_trains(tmp_path):
    """`job_defaults: {epochs: 2}` and an empty job.yaml: the trainer once re-read job.yaml alone and trained 50."""
    d = DaemonProcess(tmp_path / "d", trainer_command=None,
                      job_defaults={"epochs": 2, "target_size": 16, "batch_size": 8,
                                    "training": {"early_stopping_patience": None}})
    try:
        d.start()
        d.drop("defaults", {}, per_class=6, size_range=(16, 24))
        [job] = d.wait_jobs(1, timeout=300)
        assert job["state"] == "succeeded" and job["epoch"] == 2 and job["epochs"] == 2, d.log()[-3000:]
        summary = json.loads((d.outbox / job["id"] / "summary.json").read_text())
        assert summary["epochs"] == 2 and summary["epochs_trained"] == 2
        assert summary["spec"]["epochs"] == 2 and summary["config"]["num_epochs"] == 2
        rows = list(csv.DictReader((d.outbox / job["id"] / "metrics.csv").open()))
        assert len(rows) == 2
    finally:
        d.stop()


def test_class_folders_that_are_links_inside_the_drop_and_a_one_image_class(real_daemon):
    """Class folders that are symbolic links to folders inside the drop itself — relative, and absolute as
    `ln -s "$PWD/..."` makes them (they pointed into the inbox, and the drop has moved since) — are classes like any
    other; a class with a single image trains (it has nothing to hold out), with a warning."""
    import numpy as np
    from PIL import Image

    from trainer.data.demo import make_shapes

    d = real_daemon.start()
    staging = d.root / "staging" / "linked"
    make_shapes(staging, classes=["circle"], per_class=8, size_range=(24, 32), seed=1,
                job={"target_size": 24, "epochs": 2, "batch_size": 4, "model": {"architecture": "recipe"}})
    make_shapes(staging / ".store", classes=["square", "triangle"], per_class=8, size_range=(24, 32), seed=2)
    (staging / "lonely").mkdir()
    noise = np.random.default_rng(3).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(noise).save(staging / "lonely" / "only-one.png")
    os.symlink(".store/square", staging / "square")  # relative
    dropped = d.inbox / "linked"
    os.symlink(dropped / ".store" / "triangle", staging / "triangle")  # absolute, into the drop where it lands
    os.rename(staging, dropped)
    [job] = d.wait_jobs(1, timeout=300)
    assert job["state"] == "succeeded", (job["error"], d.log()[-3000:])
    dataset = json.loads((d.outbox / job["id"] / "dataset.json").read_text())
    assert dataset["skipped"] == [], dataset["skipped"]
    counts = {name: c["total"] for name, c in dataset["counts"].items()}
    assert counts == {"circle": 8, "lonely": 1, "square": 8, "triangle": 8}, counts
    assert dataset["counts"]["lonely"]["train"] == 1
    assert any("'lonely' has only 1 training image" in w for w in dataset["warnings"]), dataset["warnings"]
    assert json.loads((d.outbox / job["id"] / "labels.json").read_text())["classes"] == [
        "circle", "lonely", "square", "triangle"]
    kept = d.archive / job["id"]
    assert os.readlink(kept / "square") == ".store/square" and os.readlink(kept / "triangle") == ".store/triangle"
    assert len(list((kept / "triangle").iterdir())) == 8
