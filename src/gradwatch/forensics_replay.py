"""Replaying one training step to find where its first non-finite value came from.

Only the step that went non-finite is replayed, so everything here may read device values on the
host. :func:`replay` runs the kept forward again, with the step's random-number state, autocast
state and (pre-step) weights, under:

* forward hooks on every module (a stack of the modules running, and the first one, in execution
  order, whose output is non-finite; ``"input"`` when the batch itself is);
* a ``TorchFunctionMode`` that sees every torch call: the first op whose output is non-finite while
  its inputs were finite, with the range of its input, and which module made each autograd node;
* ``torch.autograd.detect_anomaly(check_nan=True)`` and a hook on every autograd node for the
  backward, which starts from the gradient the model's output really received at that step (kept
  by :mod:`gradwatch.forensics`): the first node whose output gradient is non-finite (NaN *or* Inf:
  anomaly mode looks for NaN only) while the gradient it was given was finite.

Nothing the replay touches is left changed: it calls ``torch.autograd.grad`` (no ``.grad`` is
written), and puts back the module buffers (BatchNorm's running statistics), the random-number
state and the train/eval modes it found.
"""

from __future__ import annotations

import collections
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

#: Largest number of autograd nodes hooked in a replayed backward (a bound on the replay's cost).
MAX_NODES = 200_000


@dataclass
class Capture:
    """One forward of the watched model in a training step: references, not copies."""

    args: tuple
    kwargs: dict
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    autocast: tuple[str, bool, torch.dtype]
    training: bool
    versions: list[tuple[torch.Tensor, int]]
    #: The gradient each output tensor received in the step's backward (None: none reached it).
    grads: list[torch.Tensor | None] = field(default_factory=list)
    #: Outputs whose gradient was not kept, being larger than the limit (their size in bytes).
    too_big: int = 0
    outputs_seen: bool = False
    #: The path of the submodule whose forward this was, when the model's own forward is not what the
    #: training step calls (a LightningModule's training_step calling ``self.net(x)``); None: the model's.
    prefix: str | None = None

    def keep_grad(self, i: int, limit: int, grad: torch.Tensor) -> None:
        """A tensor hook on output ``i``: keep a reference to its gradient (returns None: unchanged)."""
        if grad.numel() * grad.element_size() > limit:
            self.too_big = max(self.too_big, grad.numel() * grad.element_size())
        elif i < len(self.grads):
            self.grads[i] = grad


def nonfinite(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0 and not bool(torch.isfinite(t).all())


def value_kind(t: torch.Tensor) -> str:
    """``NaN`` if ``t`` holds one, else ``Inf``."""
    return "NaN" if bool(torch.isnan(t).any()) else "Inf"


def sample_rows(t: torch.Tensor, batch: int | None) -> list[int] | None:
    """The indices along the batch axis (the first, else the second axis of ``batch`` size) whose
    values are not all finite; None when no axis is the batch's."""
    if batch is None or t.dim() == 0:
        return None
    dims = [d for d in range(min(t.dim(), 2)) if t.shape[d] == batch]
    if not dims:
        return None
    bad = ~torch.isfinite(t.detach()).movedim(dims[0], 0).reshape(batch, -1)
    return [int(i) for i in bad.any(dim=1).nonzero().flatten().tolist()]


def batch_size(cap: Capture) -> int | None:
    """The batch size: the first axis of the first tensor given to the model."""
    for t in tree_leaves((cap.args, cap.kwargs)):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None


def _finite_range(tensors: list[torch.Tensor]) -> tuple[float, float] | None:
    vals = [t.detach().float().reshape(-1) for t in tensors if t.is_floating_point() and t.numel()]
    if not vals:
        return None
    x = vals[0][torch.isfinite(vals[0])]  # the first floating input: the op's operand
    if x.numel() == 0:
        return None
    lo, hi = torch.aminmax(x)
    return float(lo), float(hi)


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.strip("_") or name


class _ForwardWatch(TorchFunctionMode):
    """The replayed forward's module stack, first non-finite module output and op, and the module
    that made each autograd node."""

    def __init__(self, model: nn.Module, batch: int | None, root: str, prefix: str | None = None):
        super().__init__()
        self.batch = batch
        self.root = root
        self.stack: list[str] = []
        self.module: str | None = None
        self.samples: list[int] | None = None
        self.value: str | None = None
        self.op: dict[str, Any] | None = None
        self.nodes: dict[Any, str] = {}  # autograd node -> module path (keeps the nodes alive)
        self._busy = False
        self._handles = []
        self.types: dict[str, str] = {}  # module path -> its class name
        for name, m in model.named_modules():
            label = (f"{prefix}.{name}" if name else prefix) if prefix else (name or root)
            self.types[label] = type(m).__name__
            self._handles.append(m.register_forward_pre_hook(self._enter(label, m is model), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._leave(label), always_call=True))

    def _enter(self, label: str, is_root: bool):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.stack.append(label)
            if is_root and self.module is None:
                self._judge("input", (args, kwargs))
        return hook

    def _judge(self, label: str, values: Any) -> None:
        """Name ``label`` (with its samples) if ``values`` hold the first non-finite tensor."""
        self._busy = True
        try:
            bad = [t for t in tree_leaves(values) if nonfinite(t)]
            if bad:
                self.module, self.samples, self.value = label, sample_rows(bad[0], self.batch), value_kind(bad[0])
        finally:
            self._busy = False

    def _leave(self, label: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.stack:
                self.stack.pop()
            if self.module is None:
                self._judge(label, output)
        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if self._busy:
            return out
        self._busy = True
        try:
            where = self.stack[-1] if self.stack else self.root
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            for t in outs:
                node = t.grad_fn
                if node is not None and node not in self.nodes:
                    self.nodes[node] = where
            if self.op is None and self.module is None and any(nonfinite(t) for t in outs):
                ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                if not any(nonfinite(t) for t in ins):
                    node = next((t.grad_fn for t in outs if t.grad_fn is not None), None)
                    rng = _finite_range(ins)
                    bad = next(t for t in outs if nonfinite(t))
                    self.op = {"phase": "forward", "name": _name(func), "node": type(node).__name__ if node else None,
                               "module": where, "dtype": str(bad.dtype).replace("torch.", ""), "value": value_kind(bad),
                               "input_min": rng[0] if rng else None, "input_max": rng[1] if rng else None}
        finally:
            self._busy = False
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _graph(outputs: list[torch.Tensor], known: dict[Any, str]) -> list[tuple[Any, str | None]]:
    """The autograd nodes behind ``outputs`` (no leaf accumulators), each with its module: the one
    that made it, else the module of the node that reached it first (the inside of a composite op)."""
    out: list[tuple[Any, str | None]] = []
    seen: set[int] = set()
    alive: list[Any] = []  # node wrappers held while their ids are compared
    todo = [(t.grad_fn, None) for t in outputs if t.grad_fn is not None]
    while todo and len(out) < MAX_NODES:
        node, parent = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        alive.append(node)
        where = known.get(node, parent)
        if type(node).__name__ != "AccumulateGrad":
            out.append((node, where))
        todo.extend((f, where) for f, _ in node.next_functions if f is not None)
    return out


def _outermost(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The outputs whose gradient came from outside the model: an output that another one is
    computed from (the logits under a loss the model returns itself) got its gradient through it."""
    if len(pairs) < 2:
        return pairs
    below: set[int] = set()
    alive: list[Any] = []  # node wrappers held while their ids are compared
    for o, _ in pairs:
        todo = [f for f, _ in o.grad_fn.next_functions] if o.grad_fn is not None else []
        while todo and len(below) < MAX_NODES:
            f = todo.pop()
            if f is not None and id(f) not in below:
                below.add(id(f))
                alive.append(f)
                todo.extend(g for g, _ in f.next_functions)
    return [(o, g) for o, g in pairs if o.grad_fn is None or id(o.grad_fn) not in below]


def _backward(outputs: list[torch.Tensor], grads: list[torch.Tensor], params: list[torch.Tensor],
              known: dict[Any, str], batch: int | None) -> tuple[tuple | None, str | None]:
    """Run the backward from ``outputs`` with ``grads``: the first node that made a non-finite
    gradient (its type and module, its samples, NaN or Inf), and what anomaly mode said (its first NaN)."""
    first: list[tuple[dict[str, Any], list[int] | None, str]] = []

    def hook_for(node: Any, where: str | None):  # type: ignore[no-untyped-def]
        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            if first:
                return
            bad = [(g, f) for g, (f, _) in zip(grad_inputs, node.next_functions) if nonfinite(g)]
            if bad and not any(nonfinite(g) for g in grad_outputs):
                acts = [g for g, f in bad if f is not None and type(f).__name__ != "AccumulateGrad"]
                first.append(({"phase": "backward", "name": None, "node": type(node).__name__, "module": where},
                              sample_rows(acts[0], batch) if acts else None, value_kind(bad[0][0])))
        return hook

    handles = [node.register_hook(hook_for(node, where)) for node, where in _graph(outputs, known)]
    anomaly = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly(check_nan=True):
                torch.autograd.grad(outputs, params, grads, allow_unused=True)
    except RuntimeError as e:
        m = re.search(r"Function '(\w+)' returned nan", str(e))
        anomaly = m.group(1) if m else f"{type(e).__name__}: {e}"
    finally:
        for h in handles:
            h.remove()
    return (first[0] if first else None), anomaly


class _Restored:
    """Puts back, after the replay, the buffers, random-number state and modes it found. Forward
    (post) and backward hooks of the modules are set aside meanwhile: they observe (logging, the
    activation tap), and must not see the replay; forward pre-hooks stay (they make weights:
    pruning masks, weight norm)."""

    def __init__(self, model: nn.Module, cap: Capture, device: torch.device):
        self.model, self.cap, self.device = model, cap, device

    def __enter__(self) -> None:
        m = self.model
        self.hooks = [(x, x._forward_hooks, x._backward_hooks, x._backward_pre_hooks) for x in m.modules()]
        for x, *_ in self.hooks:
            x._forward_hooks, x._backward_hooks, x._backward_pre_hooks = (
                collections.OrderedDict(), collections.OrderedDict(), collections.OrderedDict())
        self.buffers = [(b, b.detach().clone()) for b in m.buffers()]
        self.modes = [(x, x.training) for x in m.modules()] if m.training != self.cap.training else []
        if self.modes:
            m.train(self.cap.training)
        self.rng = torch.get_rng_state()
        torch.set_rng_state(self.cap.rng)
        self.cuda_rng = None
        if self.cap.cuda_rng is not None and self.device.type == "cuda":
            self.cuda_rng = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.cap.cuda_rng, self.device)

    def __exit__(self, *exc: Any) -> None:
        for x, fwd, bwd, bwd_pre in self.hooks:
            x._forward_hooks, x._backward_hooks, x._backward_pre_hooks = fwd, bwd, bwd_pre
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        for x, mode in self.modes:
            x.training = mode
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


def check_inputs(cap: Capture) -> dict[str, Any] | None:
    """Whether the kept batch itself holds non-finite values (no replay needed to see that)."""
    bad = [t for t in tree_leaves((cap.args, cap.kwargs)) if nonfinite(t)]
    if not bad:
        return None
    return {"module": "input", "samples": sample_rows(bad[0], batch_size(cap)), "op": None, "value": value_kind(bad[0]),
            "batch": batch_size(cap)}


def overwritten(cap: Capture) -> bool:
    """Whether a kept input was written in place since its forward (a loader reusing its buffer)."""
    return any(t._version != v for t, v in cap.versions)


def replay_forward(model: nn.Module, cap: Capture, params: list[torch.Tensor], device: torch.device,
                   root: str, loss: str | None = None, prefix: str | None = None) -> dict[str, Any]:
    """Run ``cap``'s forward (and, if it stays finite, its backward) again; what was found. ``loss``
    names the loss function (its autograd node), for a gradient already non-finite when it left it."""
    batch = batch_size(cap)
    found: dict[str, Any] = {"module": None, "samples": None, "op": None, "value": None, "batch": batch}
    dev, enabled, dtype = cap.autocast
    with _Restored(model, cap, device), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fw = _ForwardWatch(model, batch, root, prefix)  # its hooks the only forward hooks of the replay
        try:
            with torch.autograd.detect_anomaly(check_nan=True), torch.autocast(dev, dtype=dtype, enabled=enabled), fw:
                out = model(*cap.args, **cap.kwargs)
            fw.remove()
            if fw.module is not None:
                found.update(module=fw.module, samples=fw.samples, op=fw.op, value=fw.value,
                             module_type=fw.types.get(fw.module))
                return found
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            pairs = [(o, g) for o, g in zip(outs, cap.grads) if g is not None]
            if cap.too_big:
                pairs += [(o, torch.ones_like(o)) for o, g in zip(outs, cap.grads) if g is None]
                found["note"] = (f"the gradient of the model's output ({cap.too_big / 2**20:.0f} MiB) was too large to keep, "
                                 "so the backward was replayed with ones in its place")
            pairs = _outermost(pairs)
            bad = [g for _, g in pairs if nonfinite(g)]
            if bad:  # the loss's backward made it, outside the model
                found.update(op={"phase": "backward", "name": None, "node": loss, "module": None, "loss": True},
                             samples=sample_rows(bad[0], batch), value=value_kind(bad[0]))
                return found
            if not pairs:
                found["note"] = "no gradient reached the model's output in the step, so its backward could not be replayed"
                return found
            grad_params = [p for p in params if p.requires_grad]
            first, anomaly = _backward([o for o, _ in pairs], [g for _, g in pairs], grad_params, fw.nodes, batch)
            if first is not None:
                found.update(op=first[0], samples=first[1], value=first[2])
            found["anomaly"] = anomaly
        finally:
            fw.remove()
    return found
