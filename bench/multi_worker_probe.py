"""Does one job across several hosts work (``tf.distribute.MultiWorkerMirroredStrategy``) on the pinned TensorFlow
and Keras 3? Two workers on 127.0.0.1 with ``TF_CONFIG``, a tiny Keras model, ``model.fit``.

    python bench/multi_worker_probe.py            # prints the outcome; exit 0 only if both workers trained

On TensorFlow 2.21 / Keras 3.15 (2026-11-27) both workers fail in ``fit`` with "ValueError: Attempt to convert a value
(PerReplica:{...}) with an unsupported type (<class '...values.PerReplica'>) to a Tensor" — keras-team/keras#20585
(open) and tensorflow/tensorflow#72388 — so dropfit does not offer multi-host jobs (Slurm srun, Kubernetes Indexed
Jobs). Run this again after upgrading TensorFlow or Keras.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import os
import numpy as np
import tensorflow as tf
import keras

strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "categorical_crossentropy", metrics=["accuracy"])
x = np.random.rand(64, 8, 8, 3).astype("float32")
y = keras.utils.to_categorical(np.random.randint(0, 2, 64), 2)
model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=2, verbose=0)
print("TRAINED", strategy.num_replicas_in_sync, flush=True)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import keras
    import tensorflow as tf

    workers = [f"127.0.0.1:{_port()}", f"127.0.0.1:{_port()}"]
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        procs = []
        for index in range(2):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                       TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker",
                                                                                      "index": index}}))
            procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    ok = all("TRAINED 2" in out for out in outputs)
    errors = {line.strip() for out in outputs for line in out.splitlines() if line.startswith("ValueError")}
    print(json.dumps({"tensorflow": tf.__version__, "keras": keras.__version__, "workers": 2, "trained": ok,
                      "errors": sorted(e[:300] for e in errors)}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
