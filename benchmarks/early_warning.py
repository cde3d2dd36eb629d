"""How early gradwatch warns of a slow divergence, and how often healthy schedules trip it.

Runs the learning-rate-grows-1.5%-per-step setup of tests/scenarios.py over several seeds, model
widths and batch sizes (full batch as in small real runs, and mini-batches), and healthy runs with
warm-up, cosine restarts, noisy small batches, an LSTM and a transformer. For each: the first step
whose gradient norm is non-finite, the step at which `exploding_gradients` is first raised (its
``first_step``; every rule reads only the steps up to the one it flags), and the lead between them.

    .venv/bin/python benchmarks/early_warning.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import scenarios as S  # noqa: E402

import gradwatch as gw  # noqa: E402

DIVERGING = [
    (f"growing lr, {label}, seed {seed}", dict(seed=seed, lr=lr, hidden=hidden, batch_size=bs, steps=650))
    for seed in (0, 1, 2)
    for label, lr, hidden, bs in [
        ("full batch, MLP 20-64-64-1", 0.002, (64, 64), 500),
        ("full batch, MLP 20-25-1", 0.0005, (25,), 500),
        ("batch 32, MLP 20-64-64-1", 0.002, (64, 64), 32),
    ]
]
HEALTHY = ["healthy_warmup_cosine", "healthy_cosine_restarts", "healthy_noisy_small_batches", "healthy_lstm_adam",
           "healthy_transformer_adamw", "healthy_relu_mlp_adam", "healthy_scaled_regression_sgd"]


def exploding_step(run: gw.Run) -> tuple[int | None, str]:
    """(first step of the exploding_gradients finding, which signal set it)."""
    found = [f for f in gw.diagnose(run) if f.kind == "exploding_gradients" and f.severity in ("warning", "error")]
    if not found:
        return None, ""
    f = found[0]
    ev = f.evidence
    signal = ("sustained rise" if ev.get("sustained_rise_step") == f.first_step else
              "100x crossing" if ev.get("threshold_crossing_step") == f.first_step else "update ratio or jump to non-finite")
    return f.first_step, signal


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="gradwatch-early-"))
    print("| run | first non-finite step | exploding_gradients flagged at | by | lead (steps) |")
    print("|---|---|---|---|---|")
    leads = []
    for i, (name, kw) in enumerate(DIVERGING):
        out = root / f"div{i}"
        S.growing_lr_run(out, **kw)
        run = gw.load_run(out)
        g = run.step_series("grad_norm")
        bad = np.flatnonzero(~np.isfinite(g))
        first_bad = int(run.steps[bad[0]]) if bad.size else None
        flagged, signal = exploding_step(run)
        lead = first_bad - flagged if first_bad is not None and flagged is not None else None
        leads.append(lead)
        print(f"| {name} | {first_bad} | {flagged} | {signal} | {lead} |")
    tripped = 0
    for name in HEALTHY:
        out = root / name
        S.SCENARIOS[name].train(out)
        flagged, signal = exploding_step(gw.load_run(out))
        tripped += flagged is not None
        print(f"| {name} (healthy) | — | {flagged if flagged is not None else 'not flagged'} | {signal} | — |")
    ok = [x for x in leads if x is not None]
    print()
    print(f"diverging runs: {len(leads)}; flagged before the first non-finite value: {sum(x > 0 for x in ok)}; "
          f"at least 20 steps before: {sum(x >= 20 for x in ok)}; median lead {np.median(ok) if ok else float('nan'):.0f} steps")
    print(f"healthy runs: {len(HEALTHY)}; exploding_gradients raised on {tripped}")


if __name__ == "__main__":
    main()
