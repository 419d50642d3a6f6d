"""Exposure: job content is data, never code; nothing listens beyond loopback by default; the container holds no
keys to the host."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from daemon.config import Config
from test_deploy import compose_config
from trainer.prediction.api import load_model


def test_a_model_file_with_code_in_it_is_refused(tmp_path):
    # A Lambda layer carries Python bytecode: loading it would run whatever its author wrote.
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    (tmp_path / "labels.json").write_text(json.dumps({"classes": ["a", "b", "c", "d"]}))
    with pytest.raises(ValueError, match="safe_mode"):
        load_model(tmp_path)


def test_a_plain_model_still_loads(tmp_path):
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs)).save(tmp_path / "model.keras")
    (tmp_path / "labels.json").write_text(json.dumps({"classes": ["a", "b"]}))
    model = load_model(tmp_path)
    assert model.class_names == ["a", "b"] and model.predict(np.zeros((1, 4)), verbose=0).shape == (1, 2)


def test_metrics_listen_on_loopback_unless_configured():
    assert Config().metrics.host == "127.0.0.1"


def test_the_container_gets_no_docker_socket_and_grafana_no_anonymous_or_sign_up():
    services = compose_config("compose.yaml")["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            assert "docker.sock" not in str(volume.get("source", "")), f"{name} mounts the Docker socket"
        assert not service.get("privileged"), name
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"
