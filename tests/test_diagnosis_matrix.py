"""The public scenario matrix: unhealthy runs must be diagnosed, healthy runs must be left alone.

Each scenario of ``scenarios.py`` trains once per session (cached by name). Two tests per scenario:

* ``test_scenario_behaves_as_intended`` reads the recorded series and checks that the run really
  has its problem (or really is healthy), independently of the diagnosis: a matrix of runs that do
  not fail the way they claim proves nothing.
* ``test_diagnosis`` runs ``gradwatch.diagnose``: an unhealthy run yields its finding at severity
  warning or error; a healthy run yields no warning or error.

``test_matrix_precision_and_recall`` aggregates them (precision and recall must both be 1) and
prints the confusion table. ``python tests/test_diagnosis_matrix.py`` prints the matrix as a
Markdown table for the docs.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

import gradwatch as gw

sys.path.insert(0, str(Path(__file__).parent))  # for `python tests/test_diagnosis_matrix.py`
from scenarios import NAN_STEP, SCENARIOS  # noqa: E402

SERIOUS = ("warning", "error")


# ------------------------------------------------------------------------------------ one run each

_root: Path | None = None


def _runs_root() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="gradwatch-matrix-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


@dataclass(frozen=True)
class Trained:
    path: Path
    seconds: float


@functools.lru_cache(maxsize=None)
def trained(name: str) -> Trained:
    """Train scenario ``name`` once per process; later calls return the same run directory."""
    out = _runs_root() / name
    t0 = time.perf_counter()
    SCENARIOS[name].train(out)
    return Trained(out, time.perf_counter() - t0)


@functools.lru_cache(maxsize=None)
def findings(name: str) -> tuple[gw.Finding, ...]:
    return tuple(gw.diagnose(gw.load_run(trained(name).path)))


def serious(fs: Sequence[gw.Finding]) -> dict[str, str]:
    """Kind -> highest severity, over the findings at warning or error."""
    out: dict[str, str] = {}
    for f in fs:
        if f.severity in SERIOUS and out.get(f.kind) != "error":
            out[f.kind] = f.severity
    return out


# ------------------------------------------------------------------------------------ the runs themselves


def _first_nonfinite(x: np.ndarray) -> int | None:
    bad = ~np.isfinite(x)
    return int(np.argmax(bad)) if bad.any() else None


def _weight_layers(run: gw.Run) -> list[int]:
    return [i for i, layer in enumerate(run.layers) if len(layer.shape) >= 2]


def vanishing_ratio(run: gw.Run, steps: int = 100) -> float:
    """Median grad RMS of the first weight layer over the first ``steps`` steps, relative to the last's."""
    rms = run.layer_series("grad_rms")[run.steps < steps]
    w = _weight_layers(run)
    return float(np.median(rms[:, w[0]]) / np.median(rms[:, w[-1]]))


def explosion(run: gw.Run) -> tuple[int | None, float]:
    """(first step whose gradient norm is not finite, largest finite norm / first step's norm)."""
    g = run.step_series("grad_norm").astype(np.float64)
    return _first_nonfinite(g), float(np.nanmax(np.where(np.isfinite(g), g, np.nan)) / g[0])


def zero_frac(run: gw.Run, layer: str) -> np.ndarray:
    """``grad_zero_frac`` of ``layer`` at the sampled steps."""
    z = run.layer_series("grad_zero_frac")[:, run.layer_index(layer)]
    return z[~np.isnan(z)]


def loss_first_last(run: gw.Run) -> tuple[float, float]:
    """Median loss of the first and of the last tenth of the steps."""
    loss = run.step_series("loss").astype(np.float64)
    tenth = max(1, len(loss) // 10)
    return float(np.median(loss[:tenth])), float(np.median(loss[-tenth:]))


def check_behaviour(name: str, run: gw.Run) -> None:
    """Assert that the recorded run has the problem its scenario claims (or none)."""
    s = SCENARIOS[name]
    if s.expect is None:
        for metric in ("loss", "grad_norm"):
            assert np.isfinite(run.step_series(metric)).all(), f"{name}: {metric} went non-finite"
        first, last = loss_first_last(run)
        assert last < 0.5 * first, f"{name}: the loss fell only from {first:.3g} to {last:.3g}"
        g = run.step_series("grad_norm")
        assert g.max() < 100 * np.median(g[:10]), f"{name}: grad norm peaked at {g.max():.3g}"
    elif s.expect == "vanishing_gradients":
        ratio = vanishing_ratio(run)
        assert ratio < 0.01, f"{name}: first/last weight layer grad RMS ratio {ratio:.3g} is not < 1%"
        assert np.isfinite(run.step_series("grad_norm")).all()
    elif s.expect == "exploding_gradients":
        bad, growth = explosion(run)
        assert bad is not None, f"{name}: the gradient norm never went non-finite"
        assert growth > 100, f"{name}: the gradient norm grew only {growth:.3g}x before going non-finite"
    elif s.expect == "dead_units":
        # A ReLU unit that never fires gets an exactly zero bias gradient; median over the second half.
        hidden = [layer.name for layer in run.layers if layer.name.endswith("bias") and layer.activation == "ReLU"]
        tails = [zero_frac(run, h) for h in hidden]
        worst = max(float(np.median(z[len(z) // 2 :])) for z in tails)
        assert worst > 0.8, f"{name}: at most {worst:.0%} of a hidden layer's units get no gradient"
        assert np.isfinite(run.step_series("grad_norm")).all()
    elif s.expect == "nonfinite":
        loss, g = run.step_series("loss"), run.step_series("grad_norm")
        assert _first_nonfinite(loss) == NAN_STEP and _first_nonfinite(g) == NAN_STEP
        before = g[:NAN_STEP]
        assert before.max() < 10 * np.median(before), "the gradient norm grew before the bad batch"
    else:  # pragma: no cover - a scenario of a kind this test does not know
        raise AssertionError(f"no behaviour check for {s.expect}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_behaves_as_intended(name: str) -> None:
    check_behaviour(name, gw.load_run(trained(name).path))


# ------------------------------------------------------------------------------------ the diagnosis


def check_diagnosis(name: str, fs: Sequence[gw.Finding]) -> None:
    s = SCENARIOS[name]
    found = serious(fs)
    listing = "; ".join(f"{f.kind}/{f.severity}: {f.summary}" for f in fs) or "no findings"
    if s.expect is None:
        assert not found, f"healthy run {name} got {listing}"
        return
    assert s.expect in found, f"{name} should give {s.expect} at warning or error; got {listing}"
    for kind in s.details.get("forbid", ()):
        assert all(f.kind != kind for f in fs), f"{name} must not give {kind}; got {listing}"
    origins = s.details.get("origin")
    if origins is not None:
        nonfinite = [f for f in fs if f.kind == "nonfinite"]
        assert nonfinite, f"{name} should give a nonfinite finding; got {listing}"
        assert nonfinite[0].evidence.get("origin") in origins, (
            f"{name}: nonfinite origin {nonfinite[0].evidence.get('origin')!r}, expected one of {origins}"
        )
        if "first_step" in s.details:
            assert nonfinite[0].first_step == s.details["first_step"], f"{name}: {nonfinite[0].summary}"
    lead = s.details.get("warn_before_nonfinite")
    if lead is not None:
        run = gw.load_run(trained(name).path)
        bad = _first_nonfinite(run.step_series("grad_norm"))
        flagged = min(f.first_step for f in fs if f.kind == s.expect and f.severity in SERIOUS)
        assert bad is not None and flagged <= int(run.steps[bad]) - lead, (
            f"{name}: {s.expect} flagged at step {flagged}, the first non-finite norm is at step "
            f"{None if bad is None else int(run.steps[bad])}: not {lead} steps ahead")
    for f in fs:  # every finding says what, when, and (for the expected kind) what to do
        assert f.summary and 0 <= f.first_step <= f.last_step, f
        if f.kind == s.expect and f.severity in SERIOUS:
            assert f.remedies, f"{name}: {f.kind} comes without a remedy"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_diagnosis(name: str) -> None:
    check_diagnosis(name, findings(name))


# ------------------------------------------------------------------------------------ the aggregate


@dataclass(frozen=True)
class Row:
    name: str
    expect: str | None
    found: dict[str, str]
    ok: bool
    seconds: float


def matrix() -> list[Row]:
    """Train (once) and diagnose every scenario; one row per scenario."""
    rows = []
    for name in SCENARIOS:
        fs = findings(name)
        try:
            check_diagnosis(name, fs)
            ok = True
        except AssertionError:
            ok = False
        rows.append(Row(name, SCENARIOS[name].expect, serious(fs), ok, trained(name).seconds))
    return rows


def outcome(r: Row) -> str:
    """``right``, ``wrong`` (flagged, but not as the scenario says) or ``missed`` for an unhealthy
    run; ``flagged`` or ``clean`` for a healthy one."""
    if r.expect is None:
        return "flagged" if r.found else "clean"
    return "right" if r.ok else ("wrong" if r.found else "missed")


def confusion(rows: list[Row]) -> dict[str, int]:
    """Scenario-level counts. A detection is a run with any warning or error: a true positive when
    the run is unhealthy and diagnosed as its scenario says, a false positive when the run is
    healthy or the diagnosis is wrong; an unhealthy run not diagnosed right is a false negative."""
    n = {k: 0 for k in ("right", "wrong", "missed", "flagged", "clean")}
    for r in rows:
        n[outcome(r)] += 1
    return {"tp": n["right"], "fp": n["flagged"] + n["wrong"], "fn": n["wrong"] + n["missed"], "tn": n["clean"], **n}


def precision_recall(c: dict[str, int]) -> tuple[float, float]:
    precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
    recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
    return precision, recall


def confusion_table(c: dict[str, int]) -> str:
    return "\n".join([
        "               diagnosed right   diagnosed wrong   no warning/error",
        f"unhealthy ({c['right'] + c['wrong'] + c['missed']:2d}) {c['right']:17d} {c['wrong']:17d} {c['missed']:18d}",
        f"healthy   ({c['flagged'] + c['clean']:2d}) {'':17s} {c['flagged']:17d} {c['clean']:18d}",
    ])


def _found_text(found: dict[str, str]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in found.items()) or "—"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| scenario | setup | expected | found (warning/error) | ok | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.name}` | {SCENARIOS[r.name].what} | {r.expect or 'healthy: nothing'} | "
            f"{_found_text(r.found)} | {'yes' if r.ok else '**no**'} | {r.seconds:.1f} |"
        )
    c = confusion(rows)
    p, rc = precision_recall(c)
    lines.append("")
    lines.append(f"precision {p:.2f}, recall {rc:.2f} (tp {c['tp']}, fp {c['fp']}, fn {c['fn']}, tn {c['tn']})")
    return "\n".join(lines)


def test_matrix_precision_and_recall() -> None:
    rows = matrix()
    c = confusion(rows)
    p, r = precision_recall(c)
    print("\n" + confusion_table(c) + "\n\n" + markdown(rows))
    assert (p, r) == (1.0, 1.0), f"precision {p:.2f}, recall {r:.2f}\n{confusion_table(c)}\n{markdown(rows)}"


if __name__ == "__main__":
    print(markdown(matrix()))
