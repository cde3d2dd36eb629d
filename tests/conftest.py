"""Tests that do not look at the HTML report skip drawing it (a few seconds per run): in this
process, and in every child process a test starts (the environment is inherited).

Integration tests — subprocesses, several processes, torch.compile, the browser, the framework
integrations, the scenario matrices — carry the ``integration`` marker (whole files below, single
tests by decorator); ``make test-fast`` runs the rest: rules, derivation, store, probe, guards."""

from __future__ import annotations

import importlib
import os

import pytest

os.environ["GRADWATCH_REPORT"] = "0"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one compute thread each (and in their child
    # processes), or torch's and TensorFlow's thread pools spin against each other.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(var, "1")
# This process runs Keras on torch (the PyTorch probe's tests); the TensorFlow and JAX backends are
# tested in child processes (tests/test_keras_compiled.py, tests/test_keras_backends.py).
os.environ.setdefault("KERAS_BACKEND", "torch")
session_module = importlib.import_module("gradwatch.session")


#: Files whose every test is an integration test.
INTEGRATION_FILES = frozenset({
    "test_accumulation.py", "test_amp.py", "test_benchmark_smoke.py", "test_cli.py", "test_compile.py",
    "test_crash.py", "test_diagnosis_matrix.py", "test_distributed.py", "test_doctor.py", "test_keras.py",
    "test_keras_doctor.py",
    "test_keras_compiled.py", "test_keras_backends.py", "test_keras_surgery.py", "test_optax.py",
    "test_keras_matrix.py", "test_keras_matrix_behaviour.py", "test_lightning.py", "test_report.py",
    "test_runner.py", "test_scenarios.py", "test_transformers.py", "test_zero_code_trainers.py",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in INTEGRATION_FILES:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _no_report_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "REPORT_BY_DEFAULT", False)
