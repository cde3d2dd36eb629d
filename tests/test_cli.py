"""`python -m gradwatch` as a user meets it: exit codes, one-line errors, the demo's run directory.

stderr is a pipe here, as when a run is logged to a file: no terminal, no COLUMNS, so the output
is what a log would hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


import gradwatch

TIMEOUT = 120  # a bound on a hung child, never reached by a passing run


def gw(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, "-m", "gradwatch", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_unknown_option_is_argparses_one_line_error(tmp_path):
    res = gw("demo", "--no-such-option", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert error_lines(res.stderr) == [lines[-1]]  # usage first, then exactly one error line
    assert lines[-1].startswith("gradwatch")
    assert lines[-1].endswith("unrecognized arguments: --no-such-option")
    assert res.stdout == ""


def test_missing_script_is_one_line_not_a_traceback(tmp_path):
    res = gw("run", "missing.py", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {lines}"
    assert lines[0].startswith("gradwatch: error:")
    assert "missing.py" in lines[0]
    assert not (tmp_path / "gradwatch-runs").exists()  # nothing was started


def test_flush_every_zero_is_refused_before_the_script_runs(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "x.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    res = gw("run", "--flush-every", "0", "x.py", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    [line] = error_lines(res.stderr)
    assert "--flush-every" in line and "0" in line
    assert not marker.exists()


def test_demo_trains_one_epoch_and_leaves_a_readable_run(tmp_path):
    out = tmp_path / "demo"
    res = gw("demo", "moons", "--epochs", "1", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""  # everything gradwatch says goes to stderr
    assert "0.weight" in res.stderr and "6.weight" in res.stderr  # the summary names first and last layer
    assert "seed 000" in res.stderr and "reproduced" in res.stderr
    assert "Traceback" not in res.stderr

    run = gradwatch.load_run(out / "moons" / "baseline-sigmoid")
    assert run.status == "finished"
    assert len(run.steps) == 94  # make_moons(3000) in batches of 32
    assert len(run.layers) == 8  # 4 Linear layers x (weight, bias)
    assert [layer.name for layer in run.layers][::2] == ["0.weight", "2.weight", "4.weight", "6.weight"]
    assert [layer.activation for layer in run.layers][::2] == ["Sigmoid"] * 4
    assert (out / "moons" / "compare.html").exists() and (out / "moons" / "baseline-sigmoid" / "report.html").exists()


def test_demo_lists_scenarios_and_refuses_an_unknown_one(tmp_path):
    res = gw("demo", "--list", cwd=tmp_path)
    assert res.returncode == 0 and all(name in res.stdout for name in ("circles", "moons", "exploding", "regression", "grid"))
    res = gw("demo", "mnist", cwd=tmp_path)
    assert res.returncode == 2 and "no scenario named 'mnist'" in res.stderr and "Traceback" not in res.stderr
