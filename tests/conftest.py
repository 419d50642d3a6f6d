"""Shared fixtures: generated datasets (no downloads) and helpers to run the command line as users do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data.demo import make_shapes

ROOT = Path(__file__).resolve().parent.parent


REQUIRE_SYSTEM_TOOLS = "DROPFIT_REQUIRE_SYSTEM_TOOLS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``DROPFIT_REQUIRE_SYSTEM_TOOLS=1`` (CI sets it) every skip is a failure: a test that could not run
    because the machine lacks something (a tool, root, a tmpfs) must not pass CI silently. Only tests marked
    ``optional_environment`` (they need what CI never has, e.g. a Kubernetes cluster) may still skip."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(REQUIRE_SYSTEM_TOOLS) and not hasattr(report, "wasxfail") \
            and item.get_closest_marker("optional_environment") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, which {REQUIRE_SYSTEM_TOOLS}=1 does not allow: {reason}"


def system_tool(name: str, install: str) -> str:
    """The path of a system binary the tests need (``.ci/run`` installs it); skips without it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({install}; .ci/run does)")
    return path


def env_for_subprocess() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_trainer(*args, timeout=300, check=False) -> subprocess.CompletedProcess:
    """Run ``python -m trainer ARGS`` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env_for_subprocess(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def events(stdout: str) -> list[dict]:
    """Parse a JSON-lines event stream; every line must be a JSON object with an event kind."""
    out = []
    for line in stdout.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict) and "event" in record, line
        out.append(record)
    return out


def write_corrupt_files(folder: Path) -> list[str]:
    """Add one of each kind of bad file to ``folder``; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    good = Image.fromarray(np.full((40, 40, 3), 128, np.uint8))
    good.save(folder / "whole.jpg", "JPEG")
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    good.save(folder / "whole.png", "PNG")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) - 30])
    (folder / "whole.png").unlink()
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return ["zero.jpg", "notes.txt", "truncated.jpg", "truncated.png", "garbage.png"]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """Three colour-and-shape classes, 60 images each, varied sizes/aspect ratios, mixed formats and modes,
    plus hidden files and a handful of corrupt files that must be skipped."""
    root = make_shapes(tmp_path_factory.mktemp("data") / "shapes", classes=3, per_class=60, size_range=(36, 110),
                       formats=("png", "jpeg", "bmp", "webp", "gif", "tiff"), modes=("RGB", "P", "RGBA"), seed=1)
    write_corrupt_files(root / "circle")
    (root / "square" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.png").write_bytes(b"junk")
    return root


@pytest.fixture(scope="session")
def trained(shapes_dir, tmp_path_factory):
    """One real training run through the Python API, shared by the tests that inspect its results."""
    from trainer import train_cnn

    out = tmp_path_factory.mktemp("out")
    model = train_cnn(shapes_dir, target_size=(48, 48), batch_size=16, num_epochs=10, output_dir=out, seed=3)
    return model, out
