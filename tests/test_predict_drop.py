"""Predict by drop: a folder with a ``predict.yaml`` and images, labelled by a model the same daemon trained — real
daemon, real trainer, real model, real files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import write_corrupt_files
from daemon_harness import DaemonProcess, wait_for
from trainer.data.demo import make_shapes

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A daemon (real trainer) that has trained one small model on shapes at 48x48."""
    d = DaemonProcess(tmp_path_factory.mktemp("predict") / "d", trainer_command=None, stop_grace_seconds=30).start()
    d.drop("shapes", {"target_size": 48, "epochs": 4, "batch_size": 16, "exports": ["tflite"]}, classes=3,
           per_class=30, size_range=(40, 64), formats=("png", "jpeg"))
    [job] = d.wait_jobs(1, timeout=300)
    assert job["state"] == "succeeded", d.log()[-3000:]
    yield d, job
    d.stop(signal.SIGKILL)


def drop_folder(d: DaemonProcess, name: str, build) -> None:
    staging = d.root / "staging" / name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    build(staging)
    os.rename(staging, d.inbox / name)


def wait_job(d: DaemonProcess, name: str, timeout: float = 300) -> dict:
    return wait_for(lambda: next((j for j in d.jobs() if j["name"] == name
                                  and j["state"] in ("succeeded", "failed", "cancelled")), None),
                    timeout, interval=0.2, what=f"job {name}\n{d.log()[-3000:]}")


def test_a_drop_of_unsorted_images_is_labelled_like_trainer_predict_and_nothing_is_lost(trained, tmp_path):
    from trainer.prediction.api import load_model, predict

    d, model_job = trained

    def build(root):
        make_shapes(root / "batch-1", classes=CLASSES, per_class=4, size_range=(30, 90), formats=("png", "jpeg"),
                    seed=31)
        for folder in list((root / "batch-1").iterdir()):  # not class-structured: batch-1/<shape>/...
            folder.rename(root / "batch-1" / f"from-{folder.name}")
        write_corrupt_files(root / "batch-2")
        (root / "predict.yaml").write_text(yaml.safe_dump({"model": "latest", "top_k": 2, "sort": True}))

    drop_folder(d, "to-label", build)
    job = wait_job(d, "to-label")
    assert job["state"] == "succeeded" and job["kind"] == "predict" and job["model_job"] == model_job["id"], \
        d.log()[-3000:]
    out = d.outbox / job["id"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 12 and all(r["file"].startswith("batch-1/from-") for r in rows)
    kept = d.archive / job["id"]  # where the daemon keeps a finished job's drop
    expected = predict(load_model(d.outbox / model_job["id"]), [str(kept / r["file"]) for r in rows], top_k=2)
    for row, want in zip(rows, expected, strict=True):
        assert row["label"] == want["label"] == row["label_1"]
        assert float(row["probability"]) == pytest.approx(want["probability"], abs=1e-4)
        assert row["label_2"] == want["top_k"][1]["label"]
    unreadable = {u["file"]: u["reason"] for u in json.loads((out / "predictions.json").read_text())["unreadable"]}
    assert {os.path.basename(f) for f in unreadable} == {"zero.jpg", "notes.txt", "truncated.jpg", "truncated.png",
                                                         "garbage.png"}
    assert all(reason for reason in unreadable.values())
    for r in rows:  # sorted copies, and the originals untouched
        assert (out / "sorted" / r["label"] / r["file"]).read_bytes() == (kept / r["file"]).read_bytes()
    status = json.loads((out / "status.json").read_text())
    assert status["kind"] == "predict" and status["progress"] == "12/12" and status["progress_unit"] == "images"
    samples = d.scrape()
    assert samples[("dropfit_jobs_total", (("kind", "predict"), ("outcome", "succeeded")))] == 1
    assert samples[("dropfit_images_predicted_total", ())] >= 12


def test_a_class_structured_drop_is_also_evaluated(trained):
    d, _ = trained

    def build(root):
        make_shapes(root, classes=CLASSES, per_class=8, size_range=(40, 64), seed=77,
                    job=None)
        (root / "predict.yaml").write_text("model: latest:shapes\n")

    drop_folder(d, "labelled", build)
    job = wait_job(d, "labelled")
    assert job["state"] == "succeeded", d.log()[-3000:]
    out = d.outbox / job["id"]
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 24 and set(report["per_class"]) == set(CLASSES)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    truth = [r["file"].split("/")[0] for r in rows]
    assert report["accuracy"] == pytest.approx(np.mean([t == r["label"] for t, r in zip(truth, rows, strict=True)]))
    for name in ("confusion_matrix.png", "report.html"):
        assert (out / name).is_file()
    assert "dropfit evaluation" in (out / "report.html").read_text()


@pytest.mark.parametrize(("content", "expected"), [
    ("model: latest:flowers\n", "predict.yaml: model: no trained model for a dataset named 'flowers' "
                                "(got 'latest:flowers'); trained datasets: shapes"),
    ("top_k: 0\n", "predict.yaml:1: top_k: must be >= 1, got 0"),
    ("modle: latest\n", "modle: unknown key (did you mean 'model'?)"),
    ("model: no-such-job\n", "model: no job with the id 'no-such-job'"),
    ("images: nope\n", "predict.yaml: images: no folder 'nope' in the drop"),
])
def test_a_bad_predict_yaml_is_rejected_with_a_located_reason_and_the_images_kept(trained, content, expected):
    d, _ = trained
    name = f"bad-{abs(hash(content)) % 10_000}"

    def build(root):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "a.png")
        (root / "predict.yaml").write_text(content)

    drop_folder(d, name, build)
    job = wait_job(d, name, timeout=60)
    assert job["state"] == "failed" and job["outcome"] == "rejected" and job["error_kind"] == "spec"
    assert expected in job["error"], job["error"]
    kept = d.status(job["id"])["dataset_path"]
    assert (Path(kept) / "a.png").is_file() and (Path(kept) / "predict.yaml").read_text() == content


def test_model_latest_before_any_model_exists_is_rejected_saying_why(tmp_path):
    """`model: latest` on a daemon that has trained nothing yet, and while the first training job still runs: a
    rejection that says so (and that a job is on its way), the images kept — not a crash, not a wait."""
    d = DaemonProcess(tmp_path / "d")
    try:
        d.start()

        def build(root):
            Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "a.png")
            (root / "predict.yaml").write_text("model: latest\n")

        drop_folder(d, "too-early", build)
        job = wait_job(d, "too-early", timeout=60)
        assert job["state"] == "failed" and job["outcome"] == "rejected" and job["error_kind"] == "spec", job
        assert "no trained model yet (got 'latest'); drop a dataset with a job.yaml first" in job["error"]
        assert (Path(d.status(job["id"])["dataset_path"]) / "a.png").is_file()
        d.drop("training", {"epochs": 200}, fake={"sleep": 0.1})
        wait_for(lambda: any(j["name"] == "training" and j["state"] == "running" for j in d.jobs()), 30,
                 what="the first training job running")
        drop_folder(d, "still-too-early", build)
        job = wait_job(d, "still-too-early", timeout=60)
        assert job["outcome"] == "rejected" and "1 training job is queued or running" in job["error"], job
        assert d.proc.poll() is None
    finally:
        d.stop(signal.SIGKILL)


def test_a_folder_with_both_specs_is_rejected(trained):
    d, _ = trained

    def build(root):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "a.png")
        (root / "predict.yaml").write_text("")
        (root / "job.yaml").write_text("")

    drop_folder(d, "both", build)
    job = wait_job(d, "both", timeout=60)
    assert job["outcome"] == "rejected" and "holds both job.yaml and predict.yaml" in job["error"]


def test_dropfit_models_lists_the_catalogue(trained):
    d, model_job = trained
    proc = d.cli("models")
    assert proc.returncode == 0 and model_job["id"] in proc.stdout and "tflite" in proc.stdout, proc.stdout
    [entry] = [m for m in json.loads(d.cli("models", "--json").stdout) if m["id"] == model_job["id"]]
    assert entry["dataset"] == "shapes" and entry["classes"] == CLASSES and entry["input"] == [48, 48]
    assert 0 <= entry["accuracy"] <= 1 and entry["exports"] == ["tflite"]


def _noise_images(root, count: int, size: int = 48) -> None:
    rng = np.random.default_rng(count)
    for i in range(count):
        folder = root / f"part-{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png",
                                                                                  compress_level=1)


def test_a_20000_image_drop_streams_through_the_model_in_bounded_memory(trained):
    """Held in memory at the model's 48x48x3, 20,000 images would take 138 MB more than 2,000 do; streamed in
    batches, the trainer's peak memory barely moves — its peak over the whole job, read from its summary once the
    job has ended, so writing the outputs counts too. And every image is labelled once."""
    d, _ = trained
    peaks = {}
    for count in (2_000, 20_000):
        name = f"bulk-{count}"

        def build(root, count=count):
            _noise_images(root, count)
            (root / "predict.yaml").write_text("batch_size: 64\n")

        drop_folder(d, name, build)
        job = wait_job(d, name, timeout=600)
        assert job["state"] == "succeeded", d.log()[-3000:]
        out = d.outbox / job["id"]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["images"] == count and summary["unreadable"] == 0
        with (out / "predictions.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        files = [r["file"] for r in rows]
        assert len(files) == count and set(files) == {f"part-{i // 1000:03d}/{i:06d}.png" for i in range(count)}
        assert {r["label"] for r in rows} <= set(CLASSES)
        assert all(0 <= float(r["probability"]) <= 1 for r in rows)
        peaks[count] = summary["peak_memory_mb"]
    assert peaks[20_000] - peaks[2_000] < 60, peaks
