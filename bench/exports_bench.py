"""Every export format, checked against ``model.keras`` on data anyone can get here: the trainer's own table
(``exports.json``: size, load time, images/s, ms per image, accuracy, top-1 agreement, largest probability difference),
for two jobs trained by ``python -m trainer run`` as a dropped job would be:

- ``digits28``: scikit-learn's real handwritten digits (1,797), blown up to 28x28 greyscale PNGs; 20 epochs;
- ``photos96``: generated photo-like JPEGs (5 classes x 200, ~320x240), trained at 96x96 RGB; 12 epochs.

    python bench/exports_bench.py [--json bench/results/exports.json]   (also writes exports.md, quoted in
    docs/using-models.md)

The timings are this machine's (the CPU count is recorded); agreement and accuracy are on each job's validation images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.budget_choices import digits28  # noqa: E402
from bench.datasets import photo_dataset  # noqa: E402

FORMATS = ["savedmodel", "tflite", "tflite_int8", "onnx", "openvino"]
JOBS = {"digits28": {"epochs": 20, "target_size": 28}, "photos96": {"epochs": 12, "target_size": 96}}


def run_job(name: str, data: Path, tmp: Path) -> dict:
    """Train ``data`` (a folder holding its job.yaml) as the daemon would run it; its exports table."""
    (data / "job.yaml").write_text(json.dumps({**JOBS[name], "exports": FORMATS}))
    out = tmp / f"out-{name}"
    subprocess.run([sys.executable, "-m", "trainer", "run", str(data), "--out", str(out), "--work",
                    str(tmp / f"work-{name}")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    table = json.loads((out / "exports.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    return {"job": name, "job_yaml": {**JOBS[name], "exports": FORMATS}, "epochs": summary["epochs_trained"],
            "temperature": (summary["calibration"] or {}).get("temperature"), **table}


def markdown(results: list[dict]) -> str:
    lines = ["| job | format | size | load s | images/s | ms per image | accuracy | agreement | max prob. diff. |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        for r in result["rows"]:
            cells = [result["job"], r["format"], f"{r['size_bytes'] / 1e6:.2f} MB", f"{r['load_seconds']:.2f}",
                     f"{r['images_per_second']:,.0f}", f"{r['latency_ms']:.2f}", f"{100 * r['accuracy']:.1f}%",
                     f"{100 * r['agreement']:.1f}%", f"{r['max_abs_diff']:.1e}"]
            lines.append("| " + " | ".join(cells) + " |")
    for result in results:
        for r in result["rows"]:
            other = r.get("default_precision")
            if other:
                lines.append(f"\n{result['job']}: OpenVINO left at this CPU's default precision ({other['precision']}) "
                             f"agrees on {100 * other['agreement']:.1f}%, largest probability difference "
                             f"{other['max_abs_diff']:.1e}.")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = shutil.copytree(photo_dataset(200), tmp / "photos96", ignore=shutil.ignore_patterns(".*"))
        for name, data in (("digits28", digits28(tmp / "digits28")), ("photos96", Path(photos))):
            results.append(run_job(name, data, tmp))
    record = {"machine": f"{cpu_model()}, {os.cpu_count()} cores",
              "command": "python bench/exports_bench.py --json bench/results/exports.json", "results": results}
    table = f"Machine: {record['machine']}.\n\n" + markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(table + "\n")
        quote_in_docs(table + "\n")
    return 0


def quote_in_docs(table: str) -> None:
    """Put the table between the exports markers of docs/using-models.md (tests/test_exports.py keeps them equal to
    the .md beside the JSON)."""
    page = ROOT / "docs" / "using-models.md"
    text = page.read_text()
    begin, end = "<!-- exports:begin -->\n", "<!-- exports:end -->"
    head, rest = text.split(begin, 1)
    page.write_text(head + begin + table + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    sys.exit(main())
