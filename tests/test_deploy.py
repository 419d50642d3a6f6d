"""Deployment files checked by the real tools: Compose v2's parser, hadolint, promtool, and a real Prometheus
scraping a real daemon that runs a real job."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from conftest import system_tool
from daemon.metrics import Metrics
from daemon_harness import DaemonProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = Path(__import__("compose").__file__).with_name("docker-compose")
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "dropfit.json"
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"


def prometheus_tool(name: str) -> str:
    return system_tool(name, "Debian: apt-get install prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_config(*files: str) -> dict:
    args = [str(COMPOSE)]
    for f in files:
        args += ["-f", str(ROOT / f)]
    check = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stderr
    out = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout)


def exported_sample_names() -> set[str]:
    """Every sample name the daemon's metrics can produce, from the real Metrics definitions."""
    registry = CollectorRegistry()
    Metrics(registry)
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    # Grafana's variables, as Grafana would substitute them.
    return [e.replace("$__rate_interval", "1m").replace("$job_id", ".*") for e in exprs]


# --- compose, Dockerfile -----------------------------------------------------------------------------------------

def test_compose_file_gives_gpu_daemon_prometheus_and_grafana_on_the_host_network():
    config = compose_config("compose.yaml")
    services = config["services"]
    assert set(services) == {"dropfit", "prometheus", "grafana"}
    assert all(s["network_mode"] == "host" for s in services.values())
    assert "networks" not in config or not config["networks"]
    dropfit = services["dropfit"]
    [device] = dropfit["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == -1 and device["capabilities"] == ["gpu"]
    assert {v["target"] for v in dropfit["volumes"]} >= {"/data/inbox", "/data/outbox", "/data/state"}
    assert dropfit["restart"] == "unless-stopped" and dropfit["init"] is True
    assert int(dropfit["stop_grace_period"].rstrip("s").replace("1m30", "90")) >= 60
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name} image must be pinned: {image}"
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "dropfit"  # the documented default of GRAFANA_ADMIN_PASSWORD
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert any(v["target"] == "/etc/prometheus" for v in services["prometheus"]["volumes"])


def test_cpu_override_drops_the_gpu_reservation():
    services = compose_config("compose.yaml", "compose.cpu.yaml")["services"]
    assert not services["dropfit"].get("deploy")
    assert services["dropfit"]["build"]["args"]["EXTRAS"] == ""


def test_dockerfile_passes_hadolint_and_runs_unprivileged_with_a_healthcheck():
    hadolint = Path(sys.executable).with_name("hadolint")
    proc = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M) and "FROM ${BASE_IMAGE}" in text
    assert re.search(r"^USER 10001", text, re.M) and re.search(r"^HEALTHCHECK .*\n.*dropfit\", \"health", text, re.M)
    assert re.search(r"^VOLUME .*/data/inbox", text, re.M)
    container_config = yaml.safe_load((ROOT / "docker" / "config.yaml").read_text())
    from daemon.config import Config

    Config.model_validate(container_config)



def test_the_smoke_tests_metric_check_matches_what_the_daemon_exports():
    # `make docker-smoke` greps the exposition text; a label added to a metric once broke it only in CI.
    script = (ROOT / "docker" / "smoke-test.sh").read_text()
    [pattern] = re.findall(r"/metrics\" \| grep '([^']+)'", script)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert not re.search(pattern, generate_latest(registry).decode(), re.M)
    metrics.job_ended("20261127-000000-tiny", "tiny", "succeeded", 12.0, 60.0, kind="train")
    assert re.search(pattern, generate_latest(registry).decode(), re.M)


def test_the_metrics_reference_lists_every_metric_with_its_labels():
    # The metrics table lives in docs/configuration.md, in its "## Metrics" section.
    section = (ROOT / "docs" / "configuration.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(dropfit_[a-z0-9_]+)` \| (\w+) \|([^|]*)\|", section, re.M)
    documented = {name: (kind, set(re.findall(r"`([a-z_]+)`", labels))) for name, kind, labels in rows}
    exported = {}
    for metric in vars(Metrics(CollectorRegistry())).values():
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            exported[name] = (metric._type, set(metric._labelnames))
    assert documented == exported

# --- Prometheus and Grafana files --------------------------------------------------------------------------------

def test_promtool_accepts_the_prometheus_config_and_alert_rules():
    promtool = prometheus_tool("promtool")
    for args in (["check", "config", str(ROOT / "docker" / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(ALERTS)]):
        proc = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert names == {"DropfitDaemonDown", "DropfitJobFailed", "DropfitJobStuck", "DropfitInboxBacklog"}


def test_dashboard_queries_are_valid_promql_on_exported_metrics(tmp_path):
    promtool = prometheus_tool("promtool")
    exprs = dashboard_exprs()
    assert len(exprs) >= 12
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:check{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(tmp_path / "dashboard.rules.yml")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exported = exported_sample_names() | {"up"}
    alert_exprs = [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    for expr in exprs + alert_exprs:
        used = set(re.findall(r"\b(dropfit_[a-z0-9_]+)\b", expr))
        assert used or "up{" in expr, expr
        assert used <= exported, f"{expr} uses {used - exported}"


def test_dashboard_datasource_matches_the_provisioned_one_and_covers_the_brief():
    provisioned = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    [source] = provisioned["datasources"]
    board = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in board["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in board["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}
    assert source["url"] == "http://127.0.0.1:9090" and source["type"] == "prometheus"
    text = " ".join(dashboard_exprs())
    for needed in ("dropfit_jobs_queued", "dropfit_jobs_running", "dropfit_jobs_total", "dropfit_job_epoch",
                   "dropfit_job_loss", "dropfit_job_accuracy", "dropfit_job_images_per_second",
                   "dropfit_epoch_duration_seconds", "dropfit_job_duration_seconds",
                   "dropfit_last_success_timestamp_seconds", "dropfit_job_deadline_timestamp_seconds",
                   'up{job="dropfit"}'):
        assert needed in text, needed
    provider = yaml.safe_load((ROOT / "docker/grafana/provisioning/dashboards/dropfit.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# --- a real Prometheus server on a real daemon ---------------------------------------------------------------------

def prom_query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_real_prometheus_scrapes_a_daemon_running_a_real_job(tmp_path):
    prometheus, promtool = prometheus_tool("prometheus"), prometheus_tool("promtool")
    port, prom_port = free_port(), free_port()
    daemon = DaemonProcess(tmp_path / "d", trainer_command=None, metrics={"port": port})
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(ALERTS)],
              "scrape_configs": [{"job_name": "dropfit", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    base = f"http://127.0.0.1:{prom_port}"
    try:
        daemon.start()
        # With a time budget: the "time budget left" panel has data too.
        daemon.drop("shapes", {"target_size": 24, "epochs": 12, "batch_size": 4, "time_budget": "10m"},
                    per_class=12, size_range=(20, 32))
        # First sample through Prometheus' own API (scrape every second; allow for its start-up).
        wait_for(lambda: prom_query(base, "dropfit_jobs_running")["data"]["result"], 30, interval=0.5,
                 what="the first scraped sample")
        job = wait_for(lambda: (j := daemon.jobs()) and j[0]["epoch"] >= 1 and j[0], 120, interval=0.2,
                       what="the first epoch")
        # While the job runs, every per-job series is present: promtool lints a real scrape of it.
        _, body = daemon.get("/metrics")
        lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert 'dropfit_job_accuracy{' in body
        [job] = daemon.wait_jobs(1, timeout=180)
        assert job["state"] == "succeeded"
        result = wait_for(lambda: prom_query(base, 'dropfit_jobs_total{outcome="succeeded"} == 1')["data"]["result"],
                          30, interval=0.5, what="the success in Prometheus")
        assert result[0]["metric"]["job"] == "dropfit"
        series = prom_query(base, f'dropfit_job_accuracy{{job_id="{job["id"]}", split="validation"}}')
        assert series["data"]["result"], "per-job accuracy reached Prometheus"
        for expr in dashboard_exprs():  # every panel shows data for a daemon that has run a job
            answer = wait_for(lambda e=expr: (a := prom_query(base, e))["data"]["result"] and a, 20, interval=0.5,
                              what=f"data for the dashboard query {expr}")
            assert answer["status"] == "success", (expr, answer)
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as resp:
            rules = json.loads(resp.read())["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} >= {"DropfitDaemonDown", "DropfitJobStuck"}
        assert all(r["health"] == "ok" for r in rules), rules
    finally:
        prom.send_signal(signal.SIGTERM)
        prom.wait(timeout=30)
        daemon.stop()
