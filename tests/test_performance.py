"""The fast settings the trainer picks for itself must stay correct: oneDNN, the disk cache, device settings.

Speed itself is measured in bench/ (`make bench`), not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, env_for_subprocess
from trainer.data.demo import make_shapes

_PREDICT = """
import json, sys
import numpy as np
import keras
from trainer.network.networks import build_model
keras.utils.set_random_seed(3)
model = build_model((48, 48, 3), 4, architecture="recipe")
x = np.random.default_rng(5).integers(0, 256, (16, 48, 48, 3)).astype("uint8")
import os
print(json.dumps({"onednn": os.environ["TF_ENABLE_ONEDNN_OPTS"], "p": model.predict(x, verbose=0).tolist()}))
"""


def _predict_with(onednn: str) -> dict:
    env = {**env_for_subprocess(), "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", _PREDICT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_onednn_kernels_give_the_same_predictions_as_tensorflows_default():
    on, off = _predict_with("1"), _predict_with("0")
    assert (on["onednn"], off["onednn"]) == ("1", "0")
    np.testing.assert_allclose(np.array(on["p"]), np.array(off["p"]), atol=1e-5)


def test_trainer_turns_onednn_on_unless_the_user_chose():
    code = "import os, trainer; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    env = env_for_subprocess()
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT).stdout.strip() == "1"
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT).stdout.strip() == "0"


def test_hardware_on_a_cpu_machine_resolves_to_float32_without_xla():
    from trainer.fitting.hardware import configure

    runtime = configure()
    assert (runtime.precision, runtime.jit_compile, runtime.replicas, runtime.devices) == ("float32", False, 1,
                                                                                           ["CPU"])
    multi = configure(multi_gpu=True)
    assert multi.replicas == 1 and "multi_gpu asked for, but 0 GPU(s) visible" in multi.notes[0]
    assert configure(precision="mixed_bfloat16", jit_compile=True).precision == "mixed_bfloat16"
    with pytest.raises(ValueError, match=r"precision must be one of .* Received: precision='fp8'"):
        configure(precision="fp8")


def test_a_dataset_larger_than_the_memory_budget_is_cached_on_disk_once(tmp_path):
    from trainer.data.pipeline import Batches, make_dataset, plan_cache
    from trainer.data.scan import scan_directory

    data = make_shapes(tmp_path / "data", classes=2, per_class=6, size_range=(20, 40))
    samples = scan_directory(data).samples
    cache = tmp_path / "work" / "cache"
    assert plan_cache("auto", len(samples), (32, 32), 3, cache) == ("memory", None)
    mode, folder = plan_cache("auto", len(samples), (32, 32), 3, cache, memory_fraction=1e-12)
    assert (mode, folder) == ("disk", str(cache))
    ds = make_dataset(samples, Batches(2, (32, 32), 4), cache=str(cache / "train"))
    first = np.concatenate([x.numpy() for x, _ in ds])
    assert first.dtype == np.uint8 and first.shape == (12, 32, 32, 3)  # cached as uint8, scaled in the model
    written = sorted(p.name for p in cache.iterdir())
    assert "train.index" in written and any(n.startswith("train.data") for n in written)
    # Later epochs read the cache: the images are gone and the batches are the same.
    for sample in samples:
        os.unlink(sample.path)
    again = np.concatenate([x.numpy() for x, _ in ds])
    np.testing.assert_array_equal(first, again)


def test_an_incomplete_disk_cache_from_a_killed_run_is_removed(tmp_path):
    from trainer.data.pipeline import Batches, make_dataset, plan_cache
    from trainer.data.scan import scan_directory

    data = make_shapes(tmp_path / "data", classes=2, per_class=8, size_range=(20, 40))
    samples = scan_directory(data).samples
    cache = tmp_path / "cache"
    plan_cache("disk", len(samples), (32, 32), 3, cache)
    ds = make_dataset(samples, Batches(2, (32, 32), 2), cache=str(cache / "train"))
    it = iter(ds)
    next(it)  # the first epoch stops part way, as when a job is killed
    del it
    (cache / "stray.data-00000-of-00001").write_bytes(b"partial")
    assert not (cache / "train.index").exists()
    plan_cache("disk", len(samples), (32, 32), 3, cache)
    assert sorted(p.name for p in cache.iterdir()) == []
    again = make_dataset(samples, Batches(2, (32, 32), 2), cache=str(cache / "train"))
    assert sum(int(x.shape[0]) for x, _ in again) == 16
    assert (cache / "train.index").exists()


def test_the_benchmarks_page_quotes_the_latest_benchmark_table():
    # bench/run.py writes bench/results/latest.md and quotes it between these markers in docs/benchmarks.md.
    table = (ROOT / "bench" / "results" / "latest.md").read_text()
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "<!-- bench:begin -->\n" + table + "<!-- bench:end -->" in page
