"""`make bench`: dropfit against the recipe and against the machine's own limits, measured in one run.

Prints a markdown table and writes bench/results/latest.json and latest.md (machine, versions, figures). Rates
are best-of-N (this is a shared 2-core VM whose speed varies from run to run); ratios compare figures taken in
the same run. See pipeline.py, training.py and daemon_bench.py for what each figure measures.

    python bench/run.py [--quick] [--skip daemon]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import trainer  # noqa: E402,F401 - sets TensorFlow's environment (oneDNN) before anything imports it

RESULTS = HERE / "results"


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib import metadata

    import tensorflow as tf

    gpus = [tf.config.experimental.get_device_details(g).get("device_name", g.name)
            for g in tf.config.list_physical_devices("GPU")]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PHYS_PAGES")
                                                                     * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "gpus": gpus, "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": metadata.version("keras"), "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def best(fn, repeats: int):
    results = [fn() for _ in range(repeats)]
    return max(results, key=lambda r: r[0] if isinstance(r, tuple) else r)


def bound_without_onednn() -> float:
    """The compute bound again in a fresh process with oneDNN off: TensorFlow's default on this CPU."""
    code = (f"import sys; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]; import training; "
            "print(training.bound())")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a 100-per-class dataset")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pipeline", "training", "audit", "predict", "daemon"])
    args = parser.parse_args()
    import daemon_bench
    import pipeline
    import training
    from datasets import many_files, photo_dataset

    repeats = 1 if args.quick else 3
    root = photo_dataset(100 if args.quick else 800)
    files = pipeline.files_of(root)
    out = {"machine": machine(), "dataset": {"images": len(files), "classes": 5, "target": "200x200",
                                             "batch": 32}}
    print(json.dumps(out["machine"]), flush=True)

    if "pipeline" not in args.skip:
        p = {"limit_pillow": best(lambda: pipeline.limit_pillow(files), repeats),
             "limit_tensorflow": best(lambda: pipeline.limit_tensorflow(files), repeats)}
        first, cached, _ = best(lambda: pipeline.dropfit_pipeline(root), repeats)
        p.update(dropfit_first_epoch=first, dropfit_cached=cached,
                 recipe_generator=best(lambda: pipeline.recipe_generator(root), min(repeats, 2)))
        p["limit"] = max(p["limit_pillow"], p["limit_tensorflow"])
        p["first_epoch_vs_limit"] = p["dropfit_first_epoch"] / p["limit"]
        p["cached_vs_recipe"] = p["dropfit_cached"] / p["recipe_generator"]
        p["first_epoch_vs_recipe"] = p["dropfit_first_epoch"] / p["recipe_generator"]
        out["pipeline"] = p
        print(json.dumps({"pipeline": p}), flush=True)

    if "training" not in args.skip:
        steps = 15 if args.quick else 40
        t = {"bound": best(lambda: training.bound(steps), repeats),
             "dropfit": best(lambda: training.dropfit(root, steps), repeats),
             "recipe": best(lambda: training.recipe(root, steps), min(repeats, 2)),
             "bound_without_onednn": bound_without_onednn()}
        t["efficiency"] = t["dropfit"] / t["bound"]
        t["dropfit_vs_recipe"] = t["dropfit"] / t["recipe"]
        t["onednn_speedup"] = t["bound"] / t["bound_without_onednn"]
        out["training"] = t
        print(json.dumps({"training": t}), flush=True)

    if "audit" not in args.skip:
        out["audit"] = audit_cost(files, repeats)
        print(json.dumps({"audit": out["audit"]}), flush=True)

    if "predict" not in args.skip:
        import predict_bench

        out["predict"] = predict_bench.run_all(args.quick)
        print(json.dumps({"predict": out["predict"]}), flush=True)

    if "daemon" not in args.skip:
        d = {**daemon_bench.idle(10 if args.quick else 60), **daemon_bench.latency()}
        many = many_files(10_000 if args.quick else 100_000)
        d.update(daemon_bench.scan_and_validate(many))
        d["big_drop"] = daemon_bench.big_drop(many)
        d.update(daemon_bench.polling_cost(many, seconds=10 if args.quick else 30))
        d.update(daemon_bench.idle_with_history(1000, seconds=10 if args.quick else 30))
        d.update(daemon_bench.slurm_latency(3 if args.quick else 5))
        out["daemon"] = d
        print(json.dumps({"daemon": d}), flush=True)

    name = "quick" if args.quick else "latest"
    previous = RESULTS / f"{name}.json"
    if args.skip and previous.exists():
        # A partial run updates its sections and keeps the others from the last full run.
        kept = json.loads(previous.read_text())
        out = {**{k: v for k, v in kept.items() if k in args.skip}, **out}
    table = render(out)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    if name == "latest":
        quote_in_docs(table)
    return 0


def audit_cost(files: list[str], repeats: int) -> dict:
    """The dataset audit (`trainer.data.audit`: decode, pixel hash, perceptual hash, pairs) on the photo dataset, in
    seconds per 10,000 images; the issue's target is at most 60 s on this machine."""
    from trainer.data.audit import audit

    classes = sorted({Path(f).parent.name for f in files})
    labels = [classes.index(Path(f).parent.name) for f in files]
    seconds = min(_timed(lambda: audit(files, labels)) for _ in range(max(1, min(repeats, 2))))
    return {"images": len(files), "seconds": round(seconds, 2),
            "seconds_per_10k": round(seconds * 10_000 / len(files), 1)}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def quote_in_docs(table: str) -> None:
    """Put the table between the bench markers of docs/benchmarks.md, so that page always shows the latest full run
    (tests/test_performance.py keeps the two equal)."""
    page = HERE.parent / "docs" / "benchmarks.md"
    text = page.read_text()
    begin, end = "<!-- bench:begin -->\n", "<!-- bench:end -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        page.write_text(head + begin + table + "\n" + end + rest.split(end, 1)[1])


def _r(v) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def render(out: dict) -> str:
    m = out["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB"
             f"{', GPU ' + ', '.join(m['gpus']) if m['gpus'] else ', no GPU'}; TensorFlow {m['tensorflow']}, "
             f"Keras {m['keras']}, Python {m['python']}; {m['date']}. Dataset: {out['dataset']['images']} JPEGs "
             "(~320x240, 5 classes), target 200x200, batch 32.", "",
             "| measurement | images/s | ratio | target |", "| --- | ---: | ---: | --- |"]
    p = out.get("pipeline")
    if p:
        lines += [
            f"| input: machine limit, decode+resize on all cores | {_r(p['limit'])} | 1.00 | |",
            f"| input: recipe `flow_from_directory` | {_r(p['recipe_generator'])} | "
            f"{p['recipe_generator'] / p['limit']:.2f} of limit | |",
            f"| input: dropfit first epoch (scan + decode) | {_r(p['dropfit_first_epoch'])} | "
            f"{p['first_epoch_vs_limit']:.2f} of limit | >= 0.90 of limit "
            f"{'met' if p['first_epoch_vs_limit'] >= 0.9 else 'missed'} |",
            f"| input: dropfit cached epochs | {_r(p['dropfit_cached'])} | {p['cached_vs_recipe']:.0f}x recipe | "
            f">= 50x recipe {'met' if p['cached_vs_recipe'] >= 50 else 'missed'} |"]
    t = out.get("training")
    if t:
        lines += [
            f"| training, recipe model: compute bound (in-memory tensors) | {_r(t['bound'])} | 1.00 | |",
            f"| training: dropfit pipeline | {_r(t['dropfit'])} | {t['efficiency']:.2f} of bound | >= 0.95 of bound "
            f"{'met' if t['efficiency'] >= 0.95 else 'missed'} |",
            f"| training: recipe generator | {_r(t['recipe'])} | {t['recipe'] / t['bound']:.2f} of bound | |",
            f"| training: compute bound with TensorFlow's default (oneDNN off) | {_r(t['bound_without_onednn'])} | "
            f"dropfit's bound is {t['onednn_speedup']:.2f}x | raise the bound |"]
    a = out.get("audit")
    if a:
        lines.append(f"| dataset audit (exact and near duplicates, conflicts) | {_r(a['images'] / a['seconds'])} | "
                     f"{a['seconds_per_10k']:.1f} s per 10,000 | <= 60 s per 10,000 "
                     f"{'met' if a['seconds_per_10k'] <= 60 else 'missed'} |")
    pr = out.get("predict")
    if pr:
        for name, what in (("photos", "~320x240 JPEGs, 128x128x3 model"), ("small", "28x28 PNGs, 28x28x1 model")):
            r = pr[name]
            lines.append(f"| prediction job, {r['images']:,} {what}: streamed from disk (peak memory "
                         f"{r['peak_memory_mb']:.0f} MB) | {_r(r['streamed_images_per_second'])} | "
                         f"{r['ratio']:.2f} of the model in memory ({_r(r['model_in_memory_images_per_second'])}/s) | "
                         f">= 0.80 {'met' if r['ratio'] >= 0.8 else 'missed'} |")
    d = out.get("daemon")
    if d:
        lines += ["", "| daemon | value | target |", "| --- | ---: | --- |",
                  f"| idle CPU | {d['idle_cpu_percent']:.2f}% | < 0.5% |",
                  f"| resident memory | {d['rss_mb']:.0f} MB | < 80 MB |",
                  f"| settled to trainer started | {d['settle_to_trainer_start_s']:.2f} s | < 1 s |",
                  f"| settled to first epoch (trainer start-up, TensorFlow import) | "
                  f"{d['settle_to_first_epoch_s']} s | |",
                  f"| scan + validate {d['files']:,} files, first pass | {d['scan_validate_s']:.1f} s "
                  f"({d['files_per_second']:,}/s) | seconds |"]
        if "scan_validate_warm_s" in d:
            lines.append(f"| scan + validate {d['files']:,} files, again (page cache) | "
                         f"{d['scan_validate_warm_s']:.1f} s ({d['files_per_second_warm']:,}/s) | seconds |")
        b = d.get("big_drop")
        if b:
            lines.append(f"| {b['files']:,}-file drop moved into the inbox: claimed after (settle_seconds "
                         f"{b['settle_seconds']:g} s included) | {b['moved_to_claimed_s']:.1f} s, "
                         f"{b['overflow_warnings']} event overflows | once, no events lost |")
        if "polling_cpu_ms_per_interval" in d:
            lines.append(f"| polling observer, that folder in the inbox: CPU per {d['polling_interval_s']:g} s "
                         f"interval | {d['polling_cpu_ms_per_interval']:.1f} ms | |")
        if "idle_cpu_percent_with_history" in d:
            lines.append(f"| idle CPU with {d['history_jobs']:,} finished jobs in the ledger, polled inbox | "
                         f"{d['idle_cpu_percent_with_history']:.2f}% ({d['rss_mb_with_history']:.0f} MB) | < 0.5% |")
        if d.get("slurm_submit_to_running_s") is not None:
            lines.append(f"| Slurm (local one-node cluster): submitted to the trainer running, median of "
                         f"{d['slurm_jobs']} | {d['slurm_submit_to_running_s']:.2f} s "
                         f"(max {d['slurm_submit_to_running_max_s']:.2f} s) | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
