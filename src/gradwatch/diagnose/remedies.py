"""Remedies, ranked, each an ``action`` + ``args`` that guards or surgery can apply, drawn from the seeds.

Seed 000 (Neptune): ReLU, fewer layers, Glorot init, Adam lr 0.008 for vanishing; clipvalue, Glorot +
tanh, L2 for exploding. Seed 001: clipnorm 1.0 / clipvalue 5.0 and scaling targets. Seed 002:
Glorot/LeCun/He init matched to the activation, the ReLU family, BatchNorm. Seed 003: smaller lr,
BN, L2, orthogonal init, clipping, Adam. Seed 004: tanh/ReLU instead of sigmoid, Glorot init.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..findings import Remedy


def for_vanishing(run: Any, saturating: list[str]) -> list[Remedy]:
    out: list[Remedy] = []
    if saturating:
        src = max(set(saturating), key=saturating.count)
        out.append(Remedy("swap_activation", {"from": src, "to": "ReLU", "init": "he_uniform"},
                          f"{len(saturating)} layers use {src}, whose derivative is at most "
                          f"{'0.25' if src == 'Sigmoid' else '1'} and ~0 when saturated; "
                          "ReLU passes gradients of 1 (seeds 000, 004)."))
    out.append(Remedy("reinit", {"scheme": "he_uniform" if not saturating else "glorot_uniform"},
                      "initialisation matched to the activation keeps the gradient variance constant across layers (seed 002)."))
    out.append(Remedy("insert_norm", {"kind": "batch"},
                      "normalising each layer's input re-centres activations out of the saturated range (seeds 002, 003)."))
    out.append(Remedy("set_optimizer", {"name": "Adam", "lr": 0.008},
                      "per-parameter step sizes let starved layers still move (seed 000: Adam with lr 0.008)."))
    out.append(Remedy("reduce_depth", {"layers": 1},
                      "each extra saturating layer multiplies the gradient by a factor below 1 (seed 000: one hidden layer)."))
    return out


#: A first loss this large (MSE on raw targets of scale ~100 gives ~1e4) points at unscaled targets.
LARGE_FIRST_LOSS = 100.0


def for_exploding(run: Any) -> list[Remedy]:
    ranked = _exploding_base()
    loss = run.step_series("loss")
    finite = loss[np.isfinite(loss)]
    if finite.size and float(finite[0]) > LARGE_FIRST_LOSS:
        target = next(r for r in ranked if r.action == "scale_targets")
        why = (f"the first loss is already {float(finite[0]):.3g}: targets (or inputs) of that scale produce "
               "errors and gradients as large; standardise them (seed 001's fix).")
        ranked = [Remedy(target.action, target.args, why)] + [r for r in ranked if r is not target]
    return ranked


def _exploding_base() -> list[Remedy]:
    return [
        Remedy("clip_norm", {"max_norm": 1.0},
               "caps the global gradient norm at each step without changing its direction (seed 001: clipnorm=1.0)."),
        Remedy("clip_value", {"value": 5.0},
               "caps each gradient component (seed 001: clipvalue=5.0; seed 000: clipvalue)."),
        Remedy("scale_lr", {"factor": 0.1},
               "a smaller step keeps updates proportionate to the weights (seed 003)."),
        Remedy("scale_targets", {"method": "standardize"},
               "unscaled regression targets produce huge errors and gradients (seed 001)."),
        Remedy("reinit", {"scheme": "glorot_uniform"},
               "large initial weights multiply the gradient at every layer (seed 000: U(4, 5) -> Glorot)."),
        Remedy("weight_decay", {"l2": 1e-2},
               "an L2 penalty keeps the weights, and with them the gradients, bounded (seed 000)."),
    ]


def for_nonfinite(origin: str) -> list[Remedy]:
    if origin == "forward":
        return [
            Remedy("check_data", {"nonfinite_inputs": True},
                   "the loss turned non-finite with normal gradients before it: the batch (inputs or targets) or the loss "
                   "computation produced it."),
            Remedy("skip_nonfinite", {},
                   "skipping steps whose gradients are non-finite keeps weights and optimizer state clean "
                   "while you find the bad data."),
        ]
    if origin == "backward":
        return [
            Remedy("skip_nonfinite", {},
                   "a non-finite gradient with a finite loss: skip the step, keep weights and optimizer state clean."),
            Remedy("clip_norm", {"max_norm": 1.0}, "bounds the update if the gradient is huge rather than non-finite."),
            Remedy("scale_lr", {"factor": 0.1}, "a smaller step keeps the weights in range."),
        ]
    return [
        Remedy("clip_norm", {"max_norm": 1.0},
               "the weights grew out of range after the gradient norm exploded: cap it (seed 001)."),
        Remedy("scale_lr", {"factor": 0.1}, "a smaller step keeps the weights in range (seed 003)."),
        Remedy("rollback", {"lr_factor": 0.5}, "restore the last good weights and continue with a smaller lr."),
    ]


def for_dead_units() -> list[Remedy]:
    return [
        Remedy("swap_activation", {"from": "ReLU", "to": "LeakyReLU", "negative_slope": 0.01},
               "a small slope for negative inputs lets dead units receive gradient again (seed 002: LeakyReLU, ELU, PReLU)."),
        Remedy("reinit", {"scheme": "he_uniform", "bias": 0.0},
               "He initialisation with zero biases starts about half the units active (seed 002)."),
        Remedy("scale_lr", {"factor": 0.1}, "a too-large step pushes units into the negative region for good (seed 003)."),
        Remedy("insert_norm", {"kind": "batch"}, "normalisation keeps pre-activations centred around zero (seed 002)."),
    ]


def for_loss_spike() -> list[Remedy]:
    return [
        Remedy("clip_norm", {"max_norm": 1.0}, "bounds the step that follows an outlier batch."),
        Remedy("rollback", {"lr_factor": 0.5, "skip_batches": 1},
               "restore the last good snapshot and skip the batch that caused the spike."),
        Remedy("scale_lr", {"factor": 0.5}, "spikes are a classic sign of a learning rate at the edge of stability."),
    ]


def for_stalled() -> list[Remedy]:
    return [
        Remedy("scale_lr", {"factor": 10.0}, "updates are far below the ~1e-3 of |w| per step that makes progress."),
        Remedy("set_optimizer", {"name": "Adam", "lr": 1e-3},
               "per-parameter step sizes move even with small gradients (seed 003)."),
        Remedy("reinit", {"scheme": "he_uniform"}, "a fresh, activation-matched initialisation (seed 002)."),
    ]


_SCALE_INPUTS = Remedy("scale_inputs", {"method": "standardize"},
                       "large inputs push the first layer's pre-activations into the flat tails; standardise each feature "
                       "(e.g. sklearn's StandardScaler).")


def for_saturation(acts: list[str], first_layer: bool = False) -> list[Remedy]:
    """Saturated hidden layers. When the first layer is the saturated one, its input is the usual
    cause (features in the thousands): scaling them comes first."""
    src = acts[0] if acts else "Sigmoid"
    ranked = [
        Remedy("swap_activation", {"from": src, "to": "ReLU", "init": "he_uniform"},
               f"{src} is flat beyond its 0.99 point, so its derivative there is ~0; "
               "ReLU does not saturate for x > 0 (seeds 000, 002)."),
        Remedy("reinit", {"scheme": "glorot_uniform"},
               "Glorot initialisation keeps pre-activations in the linear range of sigmoid/tanh (seeds 002, 004)."),
        Remedy("insert_norm", {"kind": "batch"}, "BatchNorm re-centres and rescales pre-activations every step (seed 002)."),
        _SCALE_INPUTS,
    ]
    return [_SCALE_INPUTS] + ranked[:-1] if first_layer else ranked


def for_no_gradient(head: Any) -> list[Remedy]:
    """No gradient anywhere: what usually zeroes it, after the remedy for the cause found."""
    out = []
    if head is not None and head.activation in ("Sigmoid", "Tanh", "Softmax", "Hardsigmoid"):
        out.append(_SCALE_INPUTS)
    out.append(Remedy("reinit", {"scheme": "glorot_uniform"},
                      "weights initialised too large pin the output where its activation is flat."))
    return out


def for_output(head: Any, mismatch: Any) -> list[Remedy]:
    """The output layer: the remedy for the cause first (the output/loss pair), then the usual."""
    out: list[Remedy] = []
    if mismatch is not None:
        out.append(Remedy(*mismatch.remedy))
        if head.family != "regression":
            return out  # the pair is the cause: nothing else to try first
    if head.family == "regression":
        out.append(Remedy("scale_targets", {"method": "standardize"},
                          "standardised targets sit where any output activation can reach them and keep the loss's "
                          "gradients of order 1 (seed 001)."))
        if not any(r.action == "change_output" for r in out) and head.activation is not None:
            out.append(Remedy("change_output", {"activation": "linear"}, "a regression output is usually linear."))
    else:
        out.append(_SCALE_INPUTS)
        out.append(Remedy("reinit", {"scheme": "glorot_uniform"},
                          "large initial weights give logits in the hundreds, which saturate the output."))
    out.append(Remedy("scale_lr", {"factor": 0.1}, "a too-large step can push the output into its flat range."))
    return out
