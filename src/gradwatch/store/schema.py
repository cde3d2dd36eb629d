"""What a run directory's series hold: the metric names, the histogram bins, the layer table entry, and
the Arrow schemas of the series and histogram files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

#: Per-step series (one value per optimizer step).
STEP_METRICS: tuple[str, ...] = (
    "loss", "grad_norm", "lr", "time", "sampled", "loss_logged",
    # What guards did (gradwatch.guards); NaN (0 for the flags) in a run without guards:
    "grad_norm_clipped",  # global norm after every guard acted (grad_norm is the one before)
    "clip_coef",          # grad_norm_clipped / grad_norm
    "clip_threshold",     # the norm threshold in force (ClipNorm's max_norm, ZClip's and AutoClip's)
    "skipped",            # 1 where a guard made the optimizer step a no-op
    "rolled_back",        # 1 where Rollback restored a snapshot before this step
    # Mixed precision (torch.amp.GradScaler); NaN (0 for the flag) without one:
    "amp_scale",          # the loss scale in force at the step
    "amp_skipped",        # 1 where GradScaler skipped the step (inf/NaN in the scaled gradients)
)
#: Step metrics that only guards write.
GUARD_METRICS = ("grad_norm_clipped", "clip_coef", "clip_threshold", "skipped", "rolled_back")
#: Step metrics that only a GradScaler writes.
AMP_METRICS = ("amp_scale", "amp_skipped")
#: Step metrics that are flags: several streams combine them with "any".
_FLAG_METRICS = ("skipped", "rolled_back", "amp_skipped")
#: Step metrics that are global norms: several streams combine them as the norm over all layers.
_NORM_METRICS = ("grad_norm", "grad_norm_clipped")

#: Per-layer series (one value per layer per step; NaN where not computed at that step).
LAYER_METRICS: tuple[str, ...] = (
    "grad_norm",
    "grad_rms",
    "grad_mean",
    "grad_std",
    "grad_maxabs",
    "grad_nonfinite",
    "grad_zero_frac",
    "weight_norm",
    "weight_rms",
    "weight_mean",
    "weight_std",
    "update_ratio",
    "act_dead_frac",
    "act_sat_frac",
    "act_const_frac",
)

#: Gradient histograms have fixed log2 bins, read straight from the float32 exponent: bin k (for
#: 1 <= k <= HIST_EXP_MAX - HIST_EXP_MIN) holds 2^(HIST_EXP_MIN+k-1) <= |g| < 2^(HIST_EXP_MIN+k);
#: bin 0 holds zeros and anything smaller than 2^HIST_EXP_MIN (~9.1e-13); the last bin anything from
#: 2^HIST_EXP_MAX (16384) up, infinities and NaN included.
HIST_EXP_MIN = -40
HIST_EXP_MAX = 14
HIST_BINS = HIST_EXP_MAX - HIST_EXP_MIN + 2


def hist_edges() -> np.ndarray:
    """The log10|g| edges of the stored histogram bins (HIST_BINS + 1 values, the outer two infinite)."""
    inner = np.arange(HIST_EXP_MIN, HIST_EXP_MAX + 1) * np.log10(2.0)
    return np.concatenate([[-np.inf], inner, [np.inf]])


@dataclass(frozen=True)
class LayerInfo:
    """One parameter tensor, named by its owning module path (e.g. ``encoder.3.attn.q_proj.weight``)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    module_type: str
    activation: str | None = None
    dtype: str = "float32"
    trainable: bool = True
    stream: int = 0

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LayerInfo":
        return cls(
            name=str(d["name"]),
            shape=tuple(int(s) for s in d["shape"]),
            numel=int(d["numel"]),
            module_type=str(d["module_type"]),
            activation=d.get("activation"),
            dtype=str(d.get("dtype", "float32")),
            trainable=bool(d.get("trainable", True)),
            stream=int(d.get("stream", 0)),
        )



def _layer_col(metric: str) -> str:
    # Step and layer metrics share names ("grad_norm"): layer columns carry a prefix on disk.
    return f"layer/{metric}"


def _series_schema(n_layers: int) -> pa.Schema:
    fields = [pa.field("step", pa.int64())]
    fields += [pa.field(name, pa.float32()) for name in STEP_METRICS]
    fields += [pa.field(_layer_col(name), pa.list_(pa.float32(), n_layers)) for name in LAYER_METRICS]
    return pa.schema(fields)


def _hist_schema(n_layers: int) -> pa.Schema:
    return pa.schema(
        [pa.field("step", pa.int64()), pa.field("hist", pa.list_(pa.float32(), n_layers * HIST_BINS))]
    )

