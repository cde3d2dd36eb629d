"""What `gradwatch run` records from unmodified trainer scripts, against what the scripts see themselves.

Runs each script of tests/trainer_scripts/ under ``python -m gradwatch run`` and compares the stored
run with the script's own log: the global gradient norm its framework reports for every optimizer
step (Lightning: the module's ``on_before_optimizer_step``; Hugging Face: the Trainer's logged
pre-clip ``grad_norm``; closure loops: the gradient of the closure's first call) and its loss.

    .venv/bin/python benchmarks/zero_code_trainers.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import gradwatch as gw

SCRIPTS = Path(__file__).resolve().parent.parent / "tests" / "trainer_scripts"

CASES = [
    ("Lightning, 7-layer sigmoid", "lightning_sigmoid.py", [], "norms", "losses"),
    ("Lightning, accumulate 2, clip 0.01", "lightning_sigmoid.py", ["--accumulate", "2", "--clip", "0.01"], "norms", "losses"),
    ("HF Trainer, max_grad_norm 1.0", "hf_trainer.py", [], "hf", "hf"),
    ("HF Trainer, accumulation 2", "hf_trainer.py", ["--accumulate", "2"], "hf", "hf"),
    ("LBFGS closure loop", "closure_loop.py", [], "first_norms", "losses"),
    ("SGD closure loop", "closure_loop.py", ["--optimizer", "sgd"], "first_norms", "losses"),
]


def reference(log: dict, norms: str, losses: str) -> tuple[np.ndarray, np.ndarray]:
    if norms == "hf":
        steps = [h for h in log["log_history"] if "loss" in h and "grad_norm" in h]
        return np.array([h["grad_norm"] for h in steps]), np.array([h["loss"] for h in steps])
    return np.array(log[norms]), np.array(log[losses])


def main() -> None:
    table = Table(title="gradwatch run on unmodified trainer scripts: stored run vs the script's own numbers")
    for col in ("script", "optimizer steps", "records", "step 0", "max rel. diff, grad norm", "max rel. diff, loss",
                "largest norm stored"):
        table.add_column(col, justify="left" if col == "script" else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, script, args, norms_key, losses_key) in enumerate(CASES):
            out, log_path = Path(tmp) / f"run{i}", Path(tmp) / f"log{i}.json"
            proc = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--no-report", "--out", str(out),
                                   str(SCRIPTS / script), str(log_path), *args], capture_output=True, text=True)
            if proc.returncode != 0:
                table.add_row(label, "failed", proc.stderr.strip().splitlines()[-1], "", "", "", "")
                continue
            norms, losses = reference(json.loads(log_path.read_text()), norms_key, losses_key)
            run = gw.load_run(out)
            stored_norm, stored_loss = run.step_series("grad_norm"), run.step_series("loss")
            same = len(stored_norm) == len(norms)
            rel = lambda a, b: f"{np.max(np.abs(a - b) / np.abs(b)):.1e}" if same else "-"  # noqa: E731
            table.add_row(label, str(len(norms)), str(len(stored_norm)),
                          "yes" if len(run.steps) and run.steps[0] == 0 and np.isfinite(stored_norm[0]) else "no",
                          rel(stored_norm, norms), rel(stored_loss, losses), f"{np.nanmax(stored_norm):.4g}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
