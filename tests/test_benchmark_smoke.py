"""The overhead benchmark runs and prints its table (timings are never asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_overhead_benchmark_quick_run_prints_a_table_with_same_weights() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick", "--models", "mlp",
         "--methods", "unmonitored,gradwatch,naive"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| mlp")]
    assert [r.split("|")[2].strip() for r in rows] == ["unmonitored", "gradwatch", "naive .item()"]
    assert all("same weights" in r for r in rows[1:])  # monitoring did not change training
