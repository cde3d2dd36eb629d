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


def test_guards_benchmark_quick_run_prints_every_guard() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "guards.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ") and "ms/step" not in line]
    for name in ("ClipNorm(1.0)", "ClipValue(1.0)", "ClipNormPerLayer(1.0)", "AGC(0.01)", "ZClip()", "AutoClip(10)",
                 "SkipNonFinite() [copy + where]", "SkipNonFinite() [fused found_inf]", "Rollback(every=100)"):
        assert name in rows, name


def test_integrations_benchmark_quick_run_prints_a_row_per_framework() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "integrations.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines()
            if line.startswith("| ") and "ms/step" not in line}
    assert set(rows) == {"pytorch", "lightning", "keras", "transformers"}, out.stdout
    assert all(row.rstrip(" |").endswith("x") or "not installed" in row for row in rows.values())


def test_distributed_benchmark_quick_run_prints_every_case() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"ddp", "ddp+clip", "fsdp2", "fsdp2+clip"}
    assert rows["ddp"][-1] == "0.00" and rows["ddp+clip"][-1] == "1.00"  # all_reduce calls per step
    assert int(rows["fsdp2"][-2].replace(",", "")) > 0  # bytes per flush


def test_compile_benchmark_quick_run_prints_every_arm() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile.py"), "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line[:20].strip(): line[20:].split() for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"compiled", "gradwatch", "gradwatch, no tap"}
    assert all(r[-1] == "1" for r in rows.values())  # one compiled frame each: no recompiles
