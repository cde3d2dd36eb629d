"""The Keras program matrix (keras_matrix.py): every program really does what its entry says.

Each program of ``tests/keras_programs`` is recorded once per session under gradwatch's zero-code
runner (in this process: Keras is imported once), and its ``check_behaviour`` reads the recorded
series: the unhealthy ones really have their problem (exactly-zero gradients are zero, the
saturated layer gets nothing, the run really diverges), the healthy ones really train. Nothing
here looks at gradwatch's diagnosis: a matrix of programs that do not fail the way they claim
would prove nothing about it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("these tests need KERAS_BACKEND=torch", allow_module_level=True)

import gradwatch as gw  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from keras_matrix import KINDS, PROGRAMS, recorded  # noqa: E402

@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_behaves_as_labelled(name: str) -> None:
    run = gw.load_run(recorded(name))
    assert run.status == "finished", f"{name}: the run is {run.status}"
    PROGRAMS[name].check_behaviour(run)


def test_matrix_is_well_formed() -> None:
    """Every program exists; every label is a known kind; the classes are covered as the issue asks."""
    for p in PROGRAMS.values():
        assert p.path.exists(), p.path
        assert p.expect is None or p.expect in KINDS, p
        assert all(a in KINDS and a != p.expect for a in p.alternatives), p
        assert not (p.expect is None and p.alternatives), p
        assert 1 <= p.cls <= 7, p
    unhealthy = [p for p in PROGRAMS.values() if p.expect is not None]
    healthy = [p for p in PROGRAMS.values() if p.expect is None]
    assert len(unhealthy) >= 12 and len(healthy) >= 10
    for cls in (1, 2, 3, 4, 6):
        assert sum(p.cls == cls for p in unhealthy) >= 2, f"class {cls} has fewer than two unhealthy programs"
    assert {p.cls for p in healthy} >= {5, 6, 7}
