"""What the diagnosis knows about a run's model, read from the stored run alone.

The rules share these facts: the weight layers in the order they ran (the gradient-flow profile
reads input side to output side in execution order, not in the order the layers were created), the
output layer with its activation, unit count and loss function, and how much the loss improved (a
true but harmless fact is info, not a warning). Nothing here imports a framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..store import LayerInfo

#: Layer types whose weights are lookup tables, not a path the gradient flows through in sequence.
EXCLUDED_FROM_FLOW = ("Embedding", "EmbeddingBag")
#: Activations with flat tails: their derivative is ~0 for large |x|.
SATURATING = ("Sigmoid", "Tanh", "Hardsigmoid", "Hardtanh", "Softsign", "LogSigmoid")
#: Steps that make the "early" window in which vanishing, saturation and dead units are judged.
EARLY_STEPS = 100
#: A loss that fell by at least this share between the first and the last tenth of the run is
#: "training well": a dead- or saturated-units finding (below its
#: error level) or an output-layer finding that comes with it is judged harmless (info). In the
#: two scenario matrices the unhealthy runs of those kinds fall by at most 23% (tanh fed raw
#: inputs), the healthy runs that have dead units by 96%; healthy runs without any fall by 25% and
#: more (a 30-step full-batch run): the bar sits between, on the cautious side (docs/diagnosis.md).
HARMLESS_IMPROVEMENT = 0.4


class RunLike(Protocol):
    layers: list[LayerInfo]
    steps: np.ndarray

    def step_series(self, name: str) -> np.ndarray: ...

    def layer_series(self, name: str) -> np.ndarray: ...


def nanmedian(x: np.ndarray, axis: int | None = None) -> Any:
    """``np.nanmedian`` (NaN for an all-NaN slice, no warning), by one sort: numpy's own goes through
    masked arrays for the small slices diagnosis takes, where it was a third of a diagnosis' time."""
    a = np.asarray(x, dtype=np.float64)
    if axis is None:
        a, axis = a.reshape(-1), 0
    if a.ndim == 0:
        return a[()]
    a = np.sort(np.moveaxis(a, axis, 0), axis=0)  # NaN sorts last
    if a.shape[0] == 0:
        med = np.full(a.shape[1:], np.nan)
        return med[()] if med.ndim == 0 else med
    n = (~np.isnan(a)).sum(axis=0)
    lo = np.take_along_axis(a, np.maximum((n - 1) // 2, 0)[None], axis=0)[0]
    hi = np.take_along_axis(a, np.minimum(n // 2, a.shape[0] - 1)[None], axis=0)[0]
    with np.errstate(invalid="ignore"):  # inf and -inf in the middle: NaN, as numpy's mean of the two
        med = np.where(n % 2 == 1, lo, (lo + hi) / 2)
    med = np.where(n > 0, med, np.nan)
    return med[()] if med.ndim == 0 else med


def early(run: RunLike) -> slice:
    return slice(0, min(EARLY_STEPS, len(run.steps)))


def split_name(name: str) -> tuple[str, str]:
    """``("encoder.0", ".weight")`` from ``encoder.0.weight``; Keras paths split at "/"
    (``sequential/dense/kernel``)."""
    cut = max(name.rfind("."), name.rfind("/"))
    return (name[:cut], name[cut:]) if cut >= 0 else ("", name)


def last_part(name: str) -> str:
    return split_name(name)[1].lstrip("./")


def sibling(name: str, last: str) -> str:
    prefix, tail = split_name(name)
    return f"{prefix}{tail[:1]}{last}" if prefix else last


def weight_layers(run: RunLike) -> list[int]:
    """Weight matrices and kernels (``*.weight``, ``weight_ih_l0``, Keras ``*/kernel``...): what
    carries the gradient flow. Embedding tables and free parameters (positional tables, scales)
    are left out."""
    return [
        i for i, layer in enumerate(run.layers)
        if len(layer.shape) >= 2 and layer.trainable and layer.module_type not in EXCLUDED_FROM_FLOW and layer.numel > 0
        and ("weight" in last_part(layer.name) or "kernel" in last_part(layer.name))
    ]


def streams(run: RunLike) -> list[list[int]]:
    """Weight-layer indices per optimizer stream, input side first: in the order the layers ran
    (recorded by the activation tap) where the run knows it, else in the layer table's order."""
    by: dict[int, list[int]] = {}
    for i in weight_layers(run):
        by.setdefault(run.layers[i].stream, []).append(i)
    info = {int(s.get("index", k)): s for k, s in enumerate(getattr(run, "streams", []) or [])}
    out = []
    for index, ids in sorted(by.items()):
        order = info.get(index, {}).get("execution_order")
        if order:
            rank = {int(i): k for k, i in enumerate(order)}
            ran = sorted((i for i in ids if i in rank), key=rank.__getitem__)
            # Layers the tap does not see (recurrent weights, attention projections) keep their
            # table place among the others: right after the executed layer that precedes them in
            # the table, in table order (before every executed layer when none precedes them).
            front: list[int] = []
            after: dict[int, list[int]] = {}
            last_ran: int | None = None
            for i in ids:
                if i in rank:
                    last_ran = i
                elif last_ran is None:
                    front.append(i)
                else:
                    after.setdefault(last_ran, []).append(i)
            merged = front + [j for i in ran for j in (i, *after.get(i, []))]
            ids = merged
        out.append(ids)
    return out


def first_stream(run: RunLike) -> list[int]:
    s = streams(run)
    return s[0] if s else []


# ---------------------------------------------------------------------------------- the loss


def loss_family(loss: str | None) -> str | None:
    """``regression``, ``binary``, ``categorical`` or None, from a recorded loss name: a Keras loss
    (``mse``, ``binary_crossentropy``, ``CategoricalCrossentropy(from_logits=True)``) or the
    autograd node that produced a torch loss (``MseLossBackward0``, ``NllLossBackward0``)."""
    if not loss:
        return None
    key = loss.lower().replace("_", "").replace(" ", "")
    if any(k in key for k in ("binarycrossentropy", "binaryfocal", "bceloss", "binarycrossentropywithlogits")):
        return "binary"
    if any(k in key for k in ("categoricalcrossentropy", "categoricalfocal", "nllloss", "crossentropy", "kldiv", "kld")):
        return "categorical"
    if any(k in key for k in ("mse", "meansquared", "mae", "meanabsolute", "huber", "l1loss", "smoothl1", "logcosh",
                              "msle", "meansquaredlogarithmic")):
        return "regression"
    return None


def takes_logits(loss: str | None) -> bool:
    """Whether the loss applies its own sigmoid/softmax (Keras ``from_logits=True``; torch's
    ``BCEWithLogits`` and ``cross_entropy``, whose node is a log-softmax followed by NLL)."""
    if not loss:
        return False
    key = loss.lower().replace("_", "")
    return "fromlogits=true" in key or "withlogits" in key or "nllloss" in key


def autograd_node(loss: str | None) -> bool:
    """Whether the loss was named by the torch autograd node that produced it."""
    return bool(loss) and "Backward" in str(loss)


# ---------------------------------------------------------------------------------- the output layer


@dataclass(frozen=True)
class Head:
    """The output layer of the first stream, and what it does early in the run.

    Attributes:
        layer: index of its weight in ``run.layers``.
        activation: the activation applied to its output (None: linear).
        units: output units (features or channels).
        loss: the recorded loss name, if any; ``family`` its kind (regression, binary, categorical).
        saturated: share of its outputs where the activation is flat, as it settled early on (the
            median of the later half of the sampled values in the first EARLY_STEPS; NaN: not known).
        dead: share of its units never positive over a batch, likewise.
        constant: share of its units that give every sample the same value, likewise.
    """

    layer: int
    name: str
    activation: str | None
    units: int
    loss: str | None
    family: str | None
    logits: bool
    saturated: float
    dead: float
    constant: float

    def describe(self) -> str:
        act = self.activation or "linear"
        return f"{self.name} ({self.units} unit{'s' if self.units != 1 else ''}, {act})"


def _units(layer: LayerInfo) -> int:
    # Keras kernels are (in, out) (convolutions (..., in, out)); torch weights (out, in, ...).
    if "kernel" in last_part(layer.name):
        return int(layer.shape[-1])
    return int(layer.shape[0])


def _settled_median(run: RunLike, metric: str, i: int) -> float:
    """Median of the sampled values over the later half of the early window (the first
    EARLY_STEPS steps, or all of a shorter run): what the layer settled into, not its first steps
    (an output driven into saturation takes a few steps to get there)."""
    v = run.layer_series(metric)[early(run)][:, i]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan
    return float(np.median(v[v.size // 2 :]))


def head(run: RunLike) -> Head | None:
    """The output layer: the last weight layer to run in the first stream."""
    ids = first_stream(run)
    if not ids:
        return None
    i = ids[-1]
    layer = run.layers[i]
    info = (getattr(run, "streams", None) or [{}])[0]
    loss = info.get("loss") if isinstance(info, dict) else None
    return Head(
        layer=i, name=layer.name, activation=layer.activation, units=_units(layer),
        loss=loss, family=loss_family(loss), logits=takes_logits(loss),
        saturated=_settled_median(run, "act_sat_frac", i),
        dead=_settled_median(run, "act_dead_frac", i),
        constant=_settled_median(run, "act_const_frac", i),
    )


def head_layers(run: RunLike) -> set[str]:
    """Each stream's output weight layer and its bias: the head, whose units are not hidden units."""
    out: set[str] = set()
    for ids in streams(run):
        name = run.layers[ids[-1]].name
        out |= {name, sibling(name, "bias")}
    return out


#: Output activations that bound the output (a regression target outside their range is unreachable).
BOUNDED = {"Sigmoid": "[0, 1]", "Hardsigmoid": "[0, 1]", "Softmax": "[0, 1]", "Tanh": "[-1, 1]",
           "Softsign": "[-1, 1]", "Hardtanh": "[-1, 1]", "ReLU": "[0, inf)", "ReLU6": "[0, 6]",
           "Softplus": "(0, inf)"}


@dataclass(frozen=True)
class Mismatch:
    """An output layer and loss that cannot learn together: why, and the remedy for the cause."""

    cause: str
    sentence: str
    remedy: tuple[str, dict[str, Any], str]


def output_mismatch(h: Head) -> Mismatch | None:
    """Output/loss pairs that cannot learn, from the layer table and the recorded loss."""
    act = h.activation
    if act == "Softmax" and h.units == 1:
        return Mismatch(
            "softmax_single_unit",
            f"a softmax over the single unit of {h.name} always outputs 1, whatever its input",
            ("change_output", {"activation": "sigmoid", "units": 1},
             "a softmax normalises over the units, so one unit is constantly 1 and passes no gradient; "
             "use a sigmoid for one output (or 2 units with softmax)."))
    if h.family == "regression" and act in BOUNDED:
        return Mismatch(
            "bounded_regression_output",
            f"{h.name} has a {act} output, which can only reach {BOUNDED[act]}, trained on a regression loss ({h.loss})",
            ("change_output", {"activation": "linear"},
             f"a regression output must be able to reach the targets; {act} bounds it to {BOUNDED[act]} "
             "and is flat (no gradient) where the targets lie outside."))
    if h.family == "categorical" and act == "Sigmoid" and h.units > 1 and not h.logits:
        return Mismatch(
            "sigmoid_categorical",
            f"{h.name} has {h.units} independent sigmoid outputs trained with {h.loss}, which expects a softmax distribution",
            ("change_output", {"activation": "softmax"},
             "categorical cross-entropy expects probabilities that sum to 1 over the classes: a softmax output."))
    if h.family in ("binary", "categorical") and act is None and not h.logits and not autograd_node(h.loss):
        # A Keras probability loss on a linear output: predictions outside [eps, 1 - eps] are clipped,
        # and a clipped prediction passes no gradient back. (A torch loss is named by its autograd
        # node; there a functional torch.sigmoid is not in the layer table, so "linear" is not known.)
        return Mismatch(
            "probability_loss_on_linear_output",
            f"{h.name} is linear but {h.loss} expects probabilities (from_logits=False)",
            ("change_loss", {"from_logits": True},
             "the loss clips predictions to (0, 1) and passes no gradient where it clips; tell it the outputs are logits "
             "(from_logits=True) or add a sigmoid/softmax output."))
    return None


# ---------------------------------------------------------------------------------- the loss curve


@dataclass(frozen=True)
class Progress:
    """How the loss moved: medians of the first and last tenth of its finite values (at least one
    each, as the terminal summary reads them) and the relative improvement between them."""

    first: float
    last: float
    improvement: float
    steps: int

    @property
    def training_well(self) -> bool:
        return math.isfinite(self.improvement) and self.improvement >= HARMLESS_IMPROVEMENT

    def sentence(self) -> str:
        change = -self.improvement
        how = f"{abs(change):.0%} {'lower' if change < 0 else 'higher'}" if math.isfinite(change) else "?"
        return f"the loss went from {fmt(self.first)} to {fmt(self.last)} ({how}) over {self.steps} steps"


def progress(run: RunLike) -> Progress | None:
    loss = run.step_series("loss").astype(np.float64)
    finite = loss[np.isfinite(loss)]
    n = finite.size
    if n < 4:
        return None
    k = max(1, math.ceil(n * 0.1))  # as the terminal summary's "median of first/last 10%" reads it
    first, last = float(np.median(finite[:k])), float(np.median(finite[-k:]))
    if first <= 0:
        return Progress(first, last, math.nan, n)
    return Progress(first, last, (first - last) / abs(first), n)


def fmt(x: float | None) -> str:
    """A number in a sentence or a table: three significant digits, in scientific notation outside
    [1e-3, 1e4)."""
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"
