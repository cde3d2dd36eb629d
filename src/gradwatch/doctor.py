"""``gradwatch doctor SCRIPT [ARGS]``: find what is wrong, try the remedies, prove the best one.

1. Run the unmodified script (``--steps`` optimizer steps, or all of it) from a fixed seed, and
   diagnose it. No warning or error: nothing to fix, nothing is changed.
2. For each remedy the findings propose (in their ranked order, at most ``--trials``, within
   ``--budget`` seconds), run the script again from the same seed with that remedy applied from
   outside (:mod:`gradwatch.treatment`): guards, lr or optimizer changes, model surgery.
3. Rank the trials: the baseline's problems gone first, then a finite run, then the metric the
   script prints (``--metric``, e.g. ``accuracy``; default ``loss``) or, where it prints none, the
   recorded loss.
4. Confirm the best with a run of the whole script (trials that already ran it whole are their own
   confirmation), print the table and write ``compare.html``.

Every run is a subprocess (``gradwatch run`` with the trial's remedy), so trials cannot leak into
each other, and a trial that hangs is cut at the budget.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .diagnose import read_findings
from .doctor_advice import locate
from .errors import GradwatchError
from .keras_treatment import keras_applicable
from .store import load_run
from .treatment import applicable, describe

#: A metric whose name contains one of these is maximised (val_accuracy, test_acc, f1); others are minimised.
MAXIMISE = ("acc", "auc", "f1", "precision", "recall", "r2", "score", "iou", "map", "bleu")


def maximised(metric: str) -> bool:
    name = metric.lower()
    return any(k in name for k in MAXIMISE)


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Stop|Exit|Refused)\b.*")


def failure_reason(stderr: str, code: int) -> str:
    """The line that says why a run failed: the exception of its traceback, or gradwatch's error."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("gradwatch: error:") or _EXCEPTION_LINE.match(line):
            return line.removeprefix("gradwatch: error: ")
    tail = [line for line in lines if not line.startswith("gradwatch:")]
    return tail[-1] if tail else f"exit code {code}"


@dataclass
class TrialResult:
    label: str
    remedies: list[dict[str, Any]]
    out: Path
    code: int
    seconds: float
    steps: int = 0
    problems: list[str] = field(default_factory=list)  # warning/error kinds found
    metric: float = math.nan  # parsed from the script's output (nan: it printed none)
    loss: float = math.nan  # median of the last 10% of recorded losses
    finite: bool = True
    complete: bool = True  # ran the whole script (not cut at --steps)
    applied: list[str] = field(default_factory=list)
    error: str = ""
    framework: str = ""  # "keras" (any backend) or meta.json's framework name (see run_framework)


def parse_metric(text: str, name: str) -> float:
    """The last number printed after ``name`` (``accuracy 0.93``, ``loss: 1.2e-3``, ``acc=0.5``)."""
    pattern = re.compile(rf"\b{re.escape(name)}\b\s*[:=]?\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)", re.IGNORECASE)
    found = pattern.findall(text)
    return float(found[-1]) if found else math.nan


def run_framework(run: Any) -> str:
    """``"keras"`` when a Keras optimizer trained the run (its stream is ``keras.SGD`` on the torch
    backend, or has framework ``keras/<backend>`` on TensorFlow and JAX); else meta.json's name."""
    for s in run.streams:
        if str(s.get("optimizer", "")).startswith("keras.") or str(s.get("framework", "")).startswith("keras/"):
            return "keras"
    return str(run.meta.get("framework", {}).get("name", ""))


def _tail_loss(run: Any) -> float:
    loss = run.step_series("loss").astype(np.float64)
    logged = np.nan_to_num(run.step_series("loss_logged"), nan=0.0) > 0
    loss = loss[logged]
    if not loss.size:
        return math.nan
    tail = loss[-max(1, len(loss) // 10):]
    return float(np.median(tail)) if np.isfinite(tail).all() else math.inf


def run_trial(
    script: str,
    args: Sequence[str],
    out: Path,
    *,
    label: str,
    remedies: list[dict[str, Any]],
    steps: int | None,
    seed: int,
    metric: str,
    timeout: float,
    module: bool = False,
) -> TrialResult:
    cmd = [sys.executable, "-m", "gradwatch", "run", "--out", str(out), "--overwrite", "--no-report", "--seed", str(seed)]
    if steps:
        cmd += ["--max-steps", str(steps)]
    if remedies:
        cmd += ["--treatment", json.dumps(remedies)]
    cmd += (["-m"] if module else []) + [script, *args]
    t0 = time.perf_counter()
    env = {**os.environ, "GRADWATCH_REPORT": "0"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1.0), env=env)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        code = -1
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = ""
    result = TrialResult(label, remedies, out, code, time.perf_counter() - t0)
    if code == -1:
        result.error = f"timed out after {result.seconds:.0f} s (the budget)"
    elif code != 0:
        result.error = failure_reason(stderr, code)
    result.applied = [line.removeprefix("gradwatch: applied ") for line in stderr.splitlines()
                      if line.startswith("gradwatch: applied ")]
    result.metric = parse_metric(stdout, metric)
    try:
        run = load_run(out)
    except GradwatchError:
        result.error = result.error or "no optimizer step was recorded"
        result.finite = False
        return result
    result.steps = len(run.steps)
    result.framework = run_framework(run)
    result.complete = not steps or result.steps < steps
    result.problems = sorted({f.kind for f in read_findings(out) if f.severity in ("warning", "error")})
    result.loss = _tail_loss(run)
    result.finite = code == 0 and math.isfinite(result.loss) and (math.isnan(result.metric) or math.isfinite(result.metric))
    return result


def candidates(findings: Sequence[Any], limit: int, framework: str = "",
               where: Callable[[str], str | None] = lambda action: None) -> tuple[list[dict[str, Any]], list[str]]:
    """Remedies to try, in the findings' ranked order (no duplicates); and advice that needs code, or
    that ``framework`` (``"keras"``: see :func:`run_framework`) has no way to apply from outside.
    ``where(action)`` names the line of the script a code change goes to, when it can be told."""
    tries: list[dict[str, Any]] = []
    advice: list[str] = []
    seen: set[str] = set()
    for f in findings:
        for r in f.remedies:
            remedy = {"action": r.action, "args": dict(r.args)}
            key = json.dumps(remedy, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            why = applicable(remedy)
            if why is None and framework == "keras":
                why = keras_applicable(remedy)
            if why is None:
                if len(tries) < limit:
                    tries.append(remedy)
            else:
                line = where(r.action)
                advice.append(f"{describe(remedy)} ({f.kind}): {why}" + (f"; here: {line}" if line else ""))
    return tries, advice


def rank_key(r: TrialResult, baseline: TrialResult, maximise: bool, by_metric: bool) -> tuple:
    """Problems gone and finite first; then the printed metric (``by_metric``) or the recorded loss."""
    ok = r.finite and not r.error
    gone = not (set(r.problems) & set(baseline.problems))
    value = r.metric if by_metric else r.loss
    if not math.isfinite(value):
        value = math.inf
    elif by_metric and maximise:
        value = -value
    return (not (gone and ok), not ok, value)


@dataclass
class DoctorReport:
    baseline: TrialResult
    trials: list[TrialResult]
    best: TrialResult | None
    confirmed: TrialResult | None
    baseline_full: TrialResult | None
    advice: list[str]
    compare: Path | None


def doctor(
    script: str,
    args: Sequence[str] = (),
    *,
    out: str | os.PathLike[str],
    steps: int | None = None,
    trials: int = 6,
    budget: float = 600.0,
    metric: str = "loss",
    seed: int = 0,
    module: bool = False,
    say: Callable[[str], None] = lambda s: None,
    progress: Callable[[str, int, int], None] | None = None,
) -> DoctorReport:
    from .report.compare import write_compare

    if not module and not os.path.isfile(script):
        raise GradwatchError(f"no such script: {script}; give the path of a Python training script.")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise GradwatchError(f"{root} exists and is not a directory; give --out a directory for the runs.")
    root.mkdir(parents=True, exist_ok=True)
    maximise = maximised(metric)
    deadline = time.perf_counter() + budget

    def trial(label: str, remedies: list[dict[str, Any]], n: int | None, sub: str) -> TrialResult:
        left = max(deadline - time.perf_counter(), 1.0)
        return run_trial(script, args, root / sub, label=label, remedies=remedies, steps=n, seed=seed,
                         metric=metric, timeout=left, module=module)

    if progress:
        progress("baseline", 0, 1)
    base = trial("baseline (unchanged)", [], steps, "baseline")
    if base.code == -1:
        raise GradwatchError(f"the unchanged script did not finish within the budget of {budget:.0f} s, so it cannot be "
                             "judged; give a larger --budget, or --steps N to try a part of it.")
    if base.error and not base.steps:
        raise GradwatchError(f"the unchanged script failed before training ({base.error}); "
                             "run it with `gradwatch run` to see why.")
    findings = [f for f in read_findings(base.out) if f.severity in ("warning", "error")]
    if not findings:
        say("nothing to fix: the baseline run has no warning or error, so doctor changes nothing.")
        return DoctorReport(base, [], None, None, None, [], None)
    base_run = load_run(base.out)
    tries, advice = candidates(findings, trials, base.framework,
                               where=lambda action: None if module else locate(script, action, base_run))
    results: list[TrialResult] = []
    for i, remedy in enumerate(tries):
        if time.perf_counter() > deadline - 2.0:
            say(f"time budget of {budget:.0f} s used up: {len(tries) - i} remedies not tried.")
            break
        if progress:
            progress(describe(remedy), i, len(tries))
        results.append(trial(describe(remedy), [remedy], steps, f"trial-{i + 1}"))
    if progress:
        progress("done", len(tries), len(tries))
    # The printed metric ranks only where every trial printed it; else the recorded loss does.
    by_metric = bool(results) and all(math.isfinite(r.metric) for r in results if r.finite and not r.error)
    if results and not by_metric and metric != "loss":
        say(f"not every trial printed '{metric}', so the trials are ranked by their recorded loss.")
    ranked = sorted(results, key=lambda r: rank_key(r, base, maximise, by_metric))
    best = ranked[0] if ranked and rank_key(ranked[0], base, maximise, by_metric)[0] is False else None
    confirmed = baseline_full = None
    if best is not None:
        if best.complete and base.complete:
            confirmed, baseline_full = best, base
        elif time.perf_counter() < deadline - 2.0:
            baseline_full = base if base.complete else trial("baseline, whole script", [], None, "baseline-full")
            confirmed = trial(f"{best.label}, whole script", best.remedies, None, "confirm")
            if confirmed.error or baseline_full.error:
                say(f"the confirmation could not finish ({confirmed.error or baseline_full.error}).")
                confirmed = None
    runs = [r.out for r in [base, *results, *([baseline_full] if baseline_full and baseline_full is not base else []),
                            *([confirmed] if confirmed and confirmed is not best else [])] if r.steps]
    compare = write_compare(runs, root / "compare.html")[0] if len(runs) > 1 else None
    return DoctorReport(base, results, best, confirmed, baseline_full, advice, compare)
