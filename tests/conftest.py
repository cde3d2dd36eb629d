"""Tests that do not look at the HTML report skip drawing it (a few seconds per run): in this
process, and in every child process a test starts (the environment is inherited)."""

from __future__ import annotations

import importlib
import os

import pytest

os.environ["GRADWATCH_REPORT"] = "0"
os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3's default backend, TensorFlow, is not installed
watch_module = importlib.import_module("gradwatch.watch")  # `gradwatch.watch` is also the function


@pytest.fixture(autouse=True)
def _no_report_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "REPORT_BY_DEFAULT", False)
