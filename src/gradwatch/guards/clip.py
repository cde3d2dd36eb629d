"""Fixed-rule clipping: by global norm, by value, by each tensor's norm, and adaptive (unit-wise) clipping."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch

from ..errors import GradwatchError
from ..probe.distributed import local_tensor
from .base import Guard, GuardSetup, GuardStep


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise GradwatchError(f"{name} must be a positive number; got {value!r}.")
    return float(value)


#: Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does (keeps 0 gradients 0).
NORM_EPS = 1e-6


class _Counted(Guard):
    """Counts, on the device, the steps at which the guard changed something (read at the end)."""

    def _count(self, step: GuardStep, acted: torch.Tensor) -> None:
        n = getattr(self, "_acted", None)
        self._acted = acted.to(torch.int64) if n is None else n + acted.to(torch.int64)
        self._steps = getattr(self, "_steps", 0) + 1

    @property
    def steps(self) -> int:
        """The steps this guard has judged so far."""
        return getattr(self, "_steps", 0)

    def summary(self) -> str | None:
        n = getattr(self, "_acted", None)
        if n is None:
            return None
        acted = int(n.item())  # sync-ok: once, when the run has ended
        return f"{self!r} acted on {acted} of {self._steps} steps"


class ClipNorm(_Counted):
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``.

    The same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (and Keras ``global_clipnorm``):
    ``g *= min(1, max_norm / (‖g‖ + 1e-6))``, from the norms the probe already computed, so it costs
    one multiply per gradient and no extra pass to measure.
    """

    def __init__(self, max_norm: float):
        self.max_norm = _positive("ClipNorm(max_norm)", max_norm)

    def setup(self, ctx: GuardSetup) -> None:
        self._threshold = torch.full((), self.max_norm, device=ctx.device)

    def before_step(self, step: GuardStep) -> None:
        norm = step.norm()
        coef = torch.clamp(self.max_norm / (norm + NORM_EPS), max=1.0)
        self._count(step, torch.isfinite(norm) & (norm > self.max_norm))  # a non-finite step is not "clipped"
        step.scale(coef)
        step.threshold = self._threshold


class ClipValue(_Counted):
    """Clamp every gradient element to ``[-value, value]`` (``clip_grad_value_``, Keras ``clipvalue``)."""

    def __init__(self, value: float):
        self.value = _positive("ClipValue(value)", value)

    def before_step(self, step: GuardStep) -> None:
        v: float | torch.Tensor = self.value
        if step.grad_scale is not None:
            v = step.grad_scale * self.value  # gradients still carrying GradScaler's scale (fused optimizer)
        # Whether anything is beyond the bound: the largest |g| per tensor, compared on the device
        # (an FSDP2 rank may hold only empty shards of small layers: nothing to compare there).
        peaks = [torch.linalg.vector_norm(g, float("inf")).to(step.device) for g in step.grads if g.numel()]
        if peaks:
            maxabs = torch.stack(peaks)
            self._count(step, (torch.isfinite(maxabs) & (maxabs > v)).any())
        for ids in step.device_groups():
            grads = [step.grads[i] for i in ids]
            if isinstance(v, torch.Tensor):
                bound = v.to(grads[0].device, grads[0].dtype)
                for g in grads:
                    torch.clamp(g, -bound, bound, out=g)
            else:
                torch._foreach_clamp_min_(grads, -v)
                torch._foreach_clamp_max_(grads, v)
        step.changed_elementwise()


class ClipNormPerLayer(_Counted):
    """Clip each gradient tensor to its own L2 norm ``max_norm`` (Keras ``clipnorm``: every
    variable's gradient separately, ``g * max_norm / max(‖g‖, max_norm)``)."""

    def __init__(self, max_norm: float):
        self.max_norm = _positive("ClipNormPerLayer(max_norm)", max_norm)

    def setup(self, ctx: GuardSetup) -> None:
        self._threshold = torch.full((), self.max_norm, device=ctx.device)

    def before_step(self, step: GuardStep) -> None:
        norms = step.norms()
        coefs = self.max_norm / torch.clamp(norms, min=self.max_norm)
        self._count(step, (torch.isfinite(norms) & (norms > self.max_norm)).any())
        step.scale_layers(coefs)
        step.threshold = self._threshold


#: Module names treated as the output layer, which AGC leaves alone (Brock et al. 2021 do not clip
#: the final linear layer). Matched against whole components of the module path.
HEAD_NAMES = ("head", "classifier", "lm_head", "fc", "logits", "output", "out")


class AGC(_Counted):
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021, "High-Performance Large-Scale Image
    Recognition Without Normalization", NFNets).

    Each unit — a row of a weight in torch's ``(out, in, ...)`` layout, i.e. one output unit's
    fan-in; each element of a bias or a 1-D weight — keeps ``‖G_i‖ <= clipping * max(‖W_i‖, eps)``.

    Args:
        clipping: the largest allowed ratio of a unit's gradient norm to its weight norm.
        eps: floor of the weight norm (so zero-initialised units can still move).
        exclude: module names left unclipped, matched against the components of each parameter's
            module path (``"head"`` matches ``head.weight`` and ``model.head.bias``). By default the
            usual names of output layers (:data:`HEAD_NAMES`); in a plain ``nn.Sequential`` none
            matches, so name the output layer (``exclude=["4"]``).
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] | None = None):
        self.clipping = _positive("AGC(clipping)", clipping)
        self.eps = _positive("AGC(eps)", eps)
        if isinstance(exclude, str):
            exclude = [exclude]
        if exclude is not None and (not isinstance(exclude, (list, tuple, set)) or not all(isinstance(e, str) for e in exclude)):
            raise GradwatchError(f"AGC(exclude) takes module names (strings), e.g. exclude=['head']; got {exclude!r}.")
        self.exclude = tuple(exclude) if exclude is not None else HEAD_NAMES

    def setup(self, ctx: GuardSetup) -> None:
        excluded = set()
        for i, layer in enumerate(ctx.layers):
            parts = layer.name.split(".")[:-1]  # the module path, without the parameter's own name
            for name in self.exclude:
                k = len(name.split("."))
                if any(".".join(parts[j : j + k]) == name for j in range(len(parts) - k + 1)):
                    excluded.add(i)
        self._excluded = excluded
        if not excluded:
            ctx.say(f"AGC: no module is named {', '.join(self.exclude)}; every layer is clipped, the output "
                    "layer too (NFNets leave it out: pass AGC(exclude=[its module name])).")

    def before_step(self, step: GuardStep) -> None:
        acted = []
        for i, p, g in zip(step.layer_ids, step.params, step.grads):
            if i in self._excluded or g.numel() == 0:
                continue
            w = local_tensor(p.detach())  # FSDP2 shards whole rows (units): unit norms stay local
            if g.dim() <= 1:
                w_norm, g_norm = w.abs(), g.abs()
            else:
                dims = tuple(range(1, g.dim()))
                w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
                g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
            max_norm = torch.clamp(w_norm, min=self.eps) * self.clipping
            if step.grad_scale is not None:
                max_norm = max_norm * step.grad_scale.to(max_norm.device)  # gradients still scaled by GradScaler
            over = g_norm > max_norm
            g.copy_(torch.where(over, g * (max_norm / torch.clamp(g_norm, min=NORM_EPS)), g))
            acted.append(over.any().to(step.device))
        if acted:
            self._count(step, torch.stack(acted).any())
        step.changed_elementwise()
