"""config.yaml: the repository's file is exactly the embedded default, errors are located, the schema is current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import Config, SpecError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_repository_config_is_the_embedded_default():
    assert load_config(ROOT / "config.yaml").model_dump() == Config().model_dump()


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "config.yaml").write_text("inbox: drop\noutbox: /srv/out\n")
    config = load_config(tmp_path / "config.yaml")
    assert config.path("inbox") == tmp_path / "drop"
    assert config.path("outbox") == Path("/srv/out")
    assert config.path("state_dir") == tmp_path / "state"


@pytest.mark.parametrize("text, expected", [
    ("max_concurrent_jobs: 0", "config.yaml:1: max_concurrent_jobs: must be >= 1, got 0"),
    ("observer: {kind: fanotify}", "observer.kind: must be one of 'inotify' or 'polling', got 'fanotify'"),
    ("after_success: shred", "after_success: must be one of 'archive', 'keep' or 'delete', got 'shred'"),
    ("job_defaults: {epochs: 0}", "job_defaults: not a valid job spec: epochs:"),
    ("gpus: all", "gpus"),
    ("inbox: [a]", "config.yaml:1: inbox: must be a string"),
])
def test_config_errors_are_located(tmp_path, text, expected):
    (tmp_path / "config.yaml").write_text(text + "\n")
    with pytest.raises(SpecError) as info:
        load_config(tmp_path / "config.yaml")
    assert expected in str(info.value)


def test_published_config_schema_is_current_and_accepts_the_shipped_file():
    shipped = json.loads((ROOT / "daemon" / "schemas" / "config.schema.json").read_text())
    assert shipped == Config.model_json_schema(), "regenerate daemon/schemas/config.schema.json"
    checker = Path(sys.executable).with_name("check-jsonschema")
    proc = subprocess.run([checker, "--schemafile", ROOT / "daemon" / "schemas" / "config.schema.json",
                           ROOT / "config.yaml"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", ["deploy/slurm/config.yaml", "deploy/k8s/config.yaml", "docker/config.yaml"])
def test_the_shipped_example_configs_are_valid(path):
    config = load_config(ROOT / path)
    assert config.ledger_path().is_absolute()


def test_a_ledger_on_a_network_filesystem_is_refused_with_where_to_put_it(tmp_path):
    from daemon.repair import LedgerLocationError, check_local_disk, filesystem_of

    mounts = ("/dev/vda1 / ext4 rw 0 0\n"
              "server:/export /shared nfs4 rw,relatime 0 0\n"
              "/dev/vdb /shared/local\\040disk xfs rw 0 0\n")  # /proc/mounts escapes a space as \040
    assert filesystem_of(Path("/shared/dropfit/ledger.sqlite3"), mounts) == ("nfs4", "/shared")
    assert filesystem_of(Path("/shared/local disk/ledger.sqlite3"), mounts) == ("xfs", "/shared/local disk")
    assert filesystem_of(Path("/var/lib/dropfit/ledger.sqlite3"), mounts) == ("ext4", "/")
    with pytest.raises(LedgerLocationError, match=r"ledger: /shared/dropfit/ledger.sqlite3 is on a nfs4 filesystem "
                                                  r"\(mounted at /shared\).*put the ledger on a local disk"):
        check_local_disk(Path("/shared/dropfit/ledger.sqlite3"), mounts)
    check_local_disk(tmp_path / "ledger.sqlite3")  # this machine's own disk: accepted
