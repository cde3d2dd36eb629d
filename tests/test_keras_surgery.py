"""gradwatch.surgery on Keras 3 models: in this process on the torch backend, and in a child process
each on TensorFlow and JAX (KERAS_BACKEND is read once per process). The checks are in
tests/keras_surgery_checks.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")

import keras_surgery_checks as checks  # noqa: E402
from gradwatch.scenarios import keras_seeds  # noqa: E402

HERE = Path(__file__).parent


@pytest.mark.parametrize("check", checks.CHECKS, ids=lambda f: f.__name__)
def test_on_keras_torch(check) -> None:  # type: ignore[no-untyped-def]
    check()


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_every_check_passes_on(backend: str) -> None:
    if keras_seeds.backend_error(backend) is not None:
        pytest.skip(f"Keras on {backend} not installed")
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    proc = subprocess.run([sys.executable, str(HERE / "keras_surgery_checks.py")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"backend {backend}" in proc.stderr
    passed = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")}
    assert passed == {f.__name__ for f in checks.CHECKS}
