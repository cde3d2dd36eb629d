"""How close each run of the two scenario matrices sits to the diagnosis's bars: the loss
improvement (the "training well" bar of facts.HARMLESS_IMPROVEMENT) and the gradient-flow
profile's input-side and smallest relative RMS (the vanishing bars), with its findings.

    GRADWATCH_REPORT=0 .venv/bin/python benchmarks/diagnosis_margins.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402

import gradwatch as gw  # noqa: E402
import keras_matrix as K  # noqa: E402
import scenarios as S  # noqa: E402
from gradwatch.diagnose import facts, rules  # noqa: E402


def describe(label: str, expect: str | None, run: gw.Run) -> None:
    prog = facts.progress(run)
    ids, rel = rules.flow_profile(run, facts.early(run))
    with np.errstate(all="ignore"):
        inp = float(rel[0]) if len(rel) else float("nan")
        worst = float(np.nanmin(rel[:-1])) if len(rel) > 1 and np.isfinite(rel[:-1]).any() else float("nan")
    kinds = ", ".join(f"{f.kind}/{f.severity}" for f in gw.diagnose(run))
    improvement = prog.improvement if prog else float("nan")
    print(f"| {label} | {expect or 'healthy'} | {improvement:+.2f} | {inp:.3g} | {worst:.3g} | {kinds} |")


def main() -> None:
    root = tempfile.mkdtemp(prefix="gradwatch-margins-")
    print("| run | label | loss improvement | input-side rel RMS | smallest rel RMS | findings |")
    print("|---|---|---|---|---|---|")
    for name, s in S.SCENARIOS.items():
        out = f"{root}/{name}"
        s.train(out)
        describe("torch: " + name, s.expect, gw.load_run(out))
    for name, p in K.PROGRAMS.items():
        describe("keras: " + name, p.expect, gw.load_run(K.record(name, f"{root}/k_{name}")))


if __name__ == "__main__":
    main()
