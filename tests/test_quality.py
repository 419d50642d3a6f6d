"""House rules that a machine can check: ruff clean, no legacy Keras APIs, light imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_legacy_keras_apis_in_the_product():
    legacy = re.compile(r"tf\.keras|ImageDataGenerator|fit_generator|\blr=")
    offenders = [f"{p}:{i}" for p in [*ROOT.glob("trainer/*.py"), *ROOT.glob("daemon/*.py")]
                 for i, line in enumerate(p.read_text().splitlines(), 1) if legacy.search(line)]
    assert offenders == []


def test_importing_trainer_is_light():
    code = "import sys, trainer; print(sorted(m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
