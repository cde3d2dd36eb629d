"""nonfinite: where the first non-finite value came from (the forward, the backward, or weights
that had already blown up)."""

from __future__ import annotations

import numpy as np

from .. import remedies as R
from ..facts import RunLike, fmt
from ...findings import Finding
from .common import first_row
from .explosion import norm_exploded_before


def nonfinite(run: RunLike) -> Finding | None:
    """Where the first non-finite value came from: the loss (forward), the gradients while the
    loss was finite (backward), or weights that had already blown up (weights)."""
    steps = run.steps
    if len(steps) == 0:
        return None
    loss = run.step_series("loss")
    flags = np.nan_to_num(run.layer_series("grad_nonfinite"), nan=0.0) > 0
    bad_grad = flags.any(axis=1)
    logged = run.step_series("loss_logged")
    # Older runs lack the flag (NaN): there, a NaN before the first finite loss means "not logged".
    was_logged = np.where(np.isnan(logged), _after_first_logged(loss), logged > 0)
    bad_loss = ~np.isfinite(loss) & was_logged
    sampled = run.step_series("sampled") > 0
    bad_w = sampled & (~np.isfinite(run.layer_series("weight_norm"))).any(axis=1)
    t_grad, t_loss, t_w = first_row(bad_grad), first_row(bad_loss), first_row(bad_w)
    candidates = [t for t in (t_grad, t_loss, t_w) if t is not None]
    if not candidates:
        return None
    row = min(candidates)
    gnorm = run.step_series("grad_norm")
    exploded_before = norm_exploded_before(gnorm, row)
    if t_w is not None and t_w <= row:
        origin = "weights"
    elif t_loss is not None and t_loss <= row:
        origin = "weights" if exploded_before else "forward"
    else:
        origin = "weights" if exploded_before else "backward"
    layer_ids = np.flatnonzero(flags[row]) if bad_grad[row] else np.array([], int)
    first_layer = run.layers[int(layer_ids[0])].name if layer_ids.size else None
    count = int((bad_grad | bad_loss).sum())
    step = int(steps[row])
    found = _forensics(run)
    where = {
        "forward": ("the loss turned non-finite while the gradients before it were normal — look at the input data and the loss "
                    "(log of 0, division by 0)"),
        "backward": f"gradients turned non-finite while the loss was finite{f', first in {first_layer}' if first_layer else ''}",
        "weights": "the weights had already grown out of range (the gradient norm exploded before it)",
    }[origin]
    summary = f"nonfinite at step {step}: {where}."
    evidence: dict = {}
    if found is not None:
        evidence = {k: found.get(k) for k in ("module", "samples", "op", "replayed", "replay_note")}
        evidence.update({k: found[k] for k in EXTRA if found.get(k) is not None})
        if found.get("step") is not None and found["step"] != step:
            evidence["forensics_step"] = found["step"]
        said = forensics_sentence(found, step)
        if said:
            summary = f"nonfinite at step {step}: {said}" + (f"; {where}." if origin == "weights" else ".")
    return Finding(
        kind="nonfinite",
        severity="error",
        first_step=step,
        last_step=int(steps[np.flatnonzero(bad_grad | bad_loss)[-1]]) if count else step,
        layers=[run.layers[int(i)].name for i in layer_ids[:20]],
        summary=summary,
        evidence={
            "origin": origin,
            "first_step": step,
            "first_layer": first_layer,
            "nonfinite_steps": count,
            "loss_at_first": float(loss[row]),
            "grad_norm_before": float(gnorm[row - 1]) if row > 0 else None,
            "steps_seen": len(steps),
            **evidence,
        },
        remedies=R.for_nonfinite(origin),
    )


def _after_first_logged(loss: np.ndarray) -> np.ndarray:
    """Steps from the first logged (finite) loss on: before it, NaN means "not logged"."""
    out = np.zeros(loss.shape, bool)
    first = first_row(np.isfinite(loss))
    if first is not None:
        out[first:] = True
    return out


#: Forensics fields copied into the evidence when present (beyond module, samples, op, replayed).
EXTRA = ("module_type", "before", "value", "batch", "samples_total", "forward", "forwards", "weights_nonfinite",
         "norm_overflow_step", "anomaly", "rank", "ranks")
#: Ops whose input has a forbidden region below zero (log of a negative number is NaN).
_DOMAIN = ("log", "log2", "log10", "log1p", "sqrt", "rsqrt", "pow", "acos", "asin", "acosh", "atanh", "lgamma")


def _forensics(run: RunLike) -> dict | None:
    """What forensics stored (the stream entries' ``forensics`` in meta.json): the earliest
    localised step, else why it could not localise one, else None (forensics was off)."""
    entries = [s.get("forensics") for s in (getattr(run, "streams", None) or [])]
    entries = [e for e in entries if isinstance(e, dict)]
    done = sorted((e for e in entries if e.get("step") is not None), key=lambda e: e["step"])
    if done:
        return done[0]
    if not entries:
        return None
    off = next((e for e in entries if e.get("replay_note")), None)
    note = off["replay_note"] if off is not None else "forensics was on but had not resolved the step when the run ended"
    return {"module": None, "samples": None, "op": None, "replayed": False, "replay_note": note}


def _samples(found: dict) -> str:
    rows, batch = found.get("samples"), found.get("batch")
    if rows is None:
        return ""
    total = found.get("samples_total") or len(rows)
    if batch is not None and total == batch and batch > 2:
        return f", in all {batch} samples of the batch"
    if not rows:
        return ""
    if total <= 5:
        listed = str(rows[0]) if total == 1 else f"{', '.join(map(str, rows[:-1]))} and {rows[-1]}"
        return f", in sample{'s' if total > 1 else ''} {listed} of the batch"
    return f", in {total} samples of the batch ({', '.join(map(str, rows[:5]))}, ...)"


def _operand(op: dict) -> str:
    lo, hi, name = op.get("input_min"), op.get("input_max"), op.get("name")
    if op.get("value") == "Inf" and name and op.get("dtype"):
        return f"its {name} overflowed {op['dtype']}"
    if lo is None or hi is None:
        return f"in its {name}" if name else ""
    if max(abs(lo), abs(hi)) >= 1e3:
        return f"its {name} input reached {fmt(hi if abs(hi) >= abs(lo) else lo)}"
    if lo < 0 and name in _DOMAIN:
        return f"its {name} input went down to {fmt(lo)}"
    return f"in its {name}"


def forensics_sentence(found: dict, step: int) -> str | None:
    """The forensics answer in words (``NaN first produced by `blocks.2.attn` (its softmax input
    reached 1e+38) at step 1234, in samples 7 and 19 of the batch``), or why there is none."""
    module, op, value = found.get("module"), found.get("op") or {}, found.get("value") or "NaN"
    at = f" at step {found['step']}" if found.get("step") not in (None, step) else ""
    rank = f" on rank {found['rank']}" if found.get("rank") is not None and found.get("ranks") else ""
    if module == "input":
        return f"the batch itself held {value}{at}{rank}{_samples(found)}"
    if found.get("before"):  # the training step calls the model's parts; the value was made between them
        return (f"{value} was made by the training step's own code before `{found['before']}` (its input was "
                f"already non-finite while the model's parts run before it stayed finite){at}{rank}{_samples(found)}")
    if module is not None:
        how = _operand(op) if op.get("phase") == "forward" else ""
        if not how and found.get("weights_nonfinite"):
            how = f"its weights were already non-finite: {', '.join(found['weights_nonfinite'][:3])}"
        kind = found.get("module_type")
        said = "; ".join(x for x in (kind, how) if x)
        return f"{value} first produced by `{module}`{f' ({said})' if said else ''}{at}{rank}{_samples(found)}"
    node, mod = op.get("node"), op.get("module")
    if op.get("loss"):
        return (f"the first {value} gradient came out of the loss{f' ({node})' if node else ''}, "
                f"outside the model{at}{rank}{_samples(found)}")
    if node:
        where = f" of `{mod}`" if mod else ""
        return (f"the first {value} gradient was made by {node} in the backward{where}{at}{rank}, while its "
                f"forward was finite{_samples(found)}")
    note = found.get("replay_note")
    return f"where it came from is unknown: {note}" if note else None
