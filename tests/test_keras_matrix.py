"""The Keras program matrix, diagnosed: real-looking user programs run unmodified under the
zero-code runner (keras_matrix.py; their behaviour is checked in test_keras_matrix_behaviour.py).

* an unhealthy program yields its labelled kind at warning or error (``expect``; the other kinds
  the same problem shows as, ``alternatives``, are reported in the table but do not count);
* a healthy program yields no warning or error (an info may say a true, harmless fact);
* no-gradient programs get an error at their first step that names the output layer or the loss;
* the slow-divergence programs are flagged at least 20 steps before their first non-finite norm.

``test_keras_matrix_precision_and_recall`` aggregates them (both must be 1) and prints the table.
``python tests/test_keras_matrix.py`` prints it as Markdown for docs/diagnosis.md.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("these tests need KERAS_BACKEND=torch", allow_module_level=True)

import gradwatch as gw  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from keras_matrix import PROGRAMS, first_nonfinite, recorded  # noqa: E402
from test_diagnosis_matrix import confusion, precision_recall  # noqa: E402  (the same counting as the torch matrix)

SERIOUS = ("warning", "error")
#: How many steps before its first non-finite gradient norm a slow divergence must be flagged.
LEAD = 20

_seconds: dict[str, float] = {}


def run_of(name: str) -> gw.Run:
    if name not in _seconds:
        t0 = time.perf_counter()
        recorded(name)
        _seconds[name] = time.perf_counter() - t0
    return gw.load_run(recorded(name))


@functools.lru_cache(maxsize=None)
def findings(name: str) -> tuple[gw.Finding, ...]:
    return tuple(gw.diagnose(run_of(name)))


def serious(fs: Sequence[gw.Finding]) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in fs:
        if f.severity in SERIOUS and out.get(f.kind) != "error":
            out[f.kind] = f.severity
    return out


def check_diagnosis(name: str, fs: Sequence[gw.Finding]) -> None:
    p = PROGRAMS[name]
    found = serious(fs)
    listing = "; ".join(f"{f.kind}/{f.severity}: {f.summary}" for f in fs) or "no findings"
    if p.expect is None:
        assert not found, f"healthy program {name} got {listing}"
        for f in fs:  # an info on a healthy run says why it was judged harmless, or what it is
            assert f.summary, f
        return
    assert p.expect in found, f"{name} should give {p.expect} at warning or error; got {listing}"
    hit = [f for f in fs if f.kind == p.expect and f.severity in SERIOUS]
    assert all(f.remedies for f in hit), f"{name}: {p.expect} comes without a remedy"
    assert all("steps_seen" in f.evidence for f in hit), f"{name}: the evidence does not say how many steps it saw"
    run = run_of(name)
    g = np.asarray(run.step_series("grad_norm"), np.float64)
    if p.cls == 2:  # no gradient at all: an error from the first step, naming the output layer or the loss
        nog = [f for f in fs if f.evidence.get("cause") and f.kind == "vanishing_gradients"]
        assert nog and nog[0].severity == "error" and nog[0].first_step == int(run.steps[0]), listing
        assert nog[0].evidence.get("output_layer") in nog[0].summary or "loss" in nog[0].summary, nog[0].summary
    if p.cls == 6:
        bad = first_nonfinite(g)
        assert bad is not None
        first = min(f.first_step for f in hit)
        assert first <= int(run.steps[bad]) - LEAD, f"{name}: flagged at {first}, non-finite at {int(run.steps[bad])}"


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_keras_program_diagnosis(name: str) -> None:
    check_diagnosis(name, findings(name))


# ------------------------------------------------------------------------------------ the aggregate


@dataclass(frozen=True)
class Row:
    name: str
    cls: int
    expect: str | None
    found: dict[str, str]
    ok: bool
    seconds: float


def matrix() -> list[Row]:
    rows = []
    for name, p in PROGRAMS.items():
        fs = findings(name)
        try:
            check_diagnosis(name, fs)
            ok = True
        except AssertionError:
            ok = False
        rows.append(Row(name, p.cls, p.expect, serious(fs), ok, _seconds.get(name, float("nan"))))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| program | class | what | expected | found (warning/error) | ok | s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        found = ", ".join(f"{k} ({v})" for k, v in r.found.items()) or "—"
        lines.append(f"| `{r.name}` | {r.cls} | {PROGRAMS[r.name].what} | {r.expect or 'healthy: nothing'} | {found} | "
                     f"{'yes' if r.ok else '**no**'} | {r.seconds:.1f} |")
    c = confusion(rows)
    p, rc = precision_recall(c)
    lines += ["", f"precision {p:.2f}, recall {rc:.2f} (tp {c['tp']}, fp {c['fp']}, fn {c['fn']}, tn {c['tn']})"]
    return "\n".join(lines)


def test_keras_matrix_precision_and_recall() -> None:
    rows = matrix()
    c = confusion(rows)
    p, r = precision_recall(c)
    print("\n" + markdown(rows))
    assert (p, r) == (1.0, 1.0), f"precision {p:.2f}, recall {r:.2f}\n{markdown(rows)}"


if __name__ == "__main__":
    print(markdown(matrix()))
