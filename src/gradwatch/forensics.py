"""Forensics: where the first non-finite value of a run came from — the module, the op, the samples.

Armed (the default), a stream keeps, for the step in progress, references to what a replay of it
would need, and nothing else:

* a forward pre-hook on the model keeps each forward's inputs (references: no copy), the
  random-number state (5 KB on the CPU; seed and offset on a GPU), the autocast state and the
  train/eval mode; a forward hook puts a tensor hook on the output that keeps the gradient the
  output receives in the backward (a reference; not kept above :data:`KEEP_GRAD_BYTES`);
* at the optimizer step, one device flag, ``isfinite(all gradient norms)`` from the norms the
  probe computed anyway, is copied into a host buffer (pinned, non-blocking on a GPU, with an event).

Nothing is read on the host in a way that waits for the device. On the CPU the flag is in host
memory at once, so a non-finite step is known before its update, with the weights that made it
still in place. On a GPU the event is polled at the next step (``query()``, which never blocks):
the step is known one step late, after its update. Healthy steps then drop what they kept.

At the first non-finite step the forward (and, if it stays finite, the backward) is replayed by
:mod:`gradwatch.forensics_replay`, and the answer goes into the stream's ``meta.json`` entry
(``forensics``), where the ``nonfinite`` rule reads it. Then the hooks come off: the rest of the
run costs nothing. Forensics never changes training: the replay writes no ``.grad`` and puts back
buffers, random state and modes; a step whose update was applied before forensics learned of it
(a GPU, no SkipNonFinite guard) is not replayed — the kept batch is still checked. See docs/nan.md.
"""

from __future__ import annotations

import collections
import functools
import sys
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .forensics_replay import Capture, check_inputs, overwritten, replay_forward

#: Largest model-output gradient kept for the replayed backward (bytes); above it, ones stand in.
KEEP_GRAD_BYTES = 64 * 2**20
#: Forwards kept per optimizer step (gradient accumulation, several calls of the model).
MAX_FORWARDS = 16
#: Batch indices listed in the record (beyond it, their count).
MAX_SAMPLES = 256
#: Steps whose flag may be in flight at once (a GPU running behind the host).
SLOTS = 8

WHY_LATE = ("the update of step {step} had already been applied when gradwatch learned of it (on a GPU it "
            "learns of a step one step later, without waiting for the device) and no SkipNonFinite guard kept "
            "its weights, so only the kept batch was checked")


class Pending:
    """A step whose flag is on its way to the host, with what its replay would need."""

    def __init__(self, step: int, forwards: list[Capture], slot: int, event: Any, dropped: int):
        self.step, self.forwards, self.slot, self.event, self.dropped = step, forwards, slot, event, dropped


def unsupported(model: nn.Module, params: list[torch.Tensor]) -> str | None:
    """Why a model cannot be replayed on one rank alone, or None."""
    from .probe.distributed import is_dtensor

    if any(is_dtensor(p) for p in params):
        return "its weights are sharded over the ranks (FSDP), so one rank alone cannot replay a step"
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return "SyncBatchNorm's forward needs every rank, so one rank alone cannot replay a step"
    return None


def capture_target(raw: nn.Module | None, model: nn.Module) -> nn.Module:
    """The module whose call starts a forward, outside any torch.compile graph: the outermost
    ``OptimizedModule`` around ``model`` (given, or a live one), else ``model`` itself."""
    m = raw
    for _ in range(8):
        if m is None or m is model:
            break
        if isinstance(getattr(m, "_orig_mod", None), nn.Module):
            return m
        m = getattr(m, "module", None)
    frames = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything was compiled
    wrapper = getattr(frames, "OptimizedModule", None)
    if wrapper is not None:
        from .objects import live_instances

        for o in live_instances(wrapper):
            if getattr(o, "_orig_mod", None) is model:
                return o
    return model


class Forensics:
    """One stream's forensics: the kept step, the device flag, the replay, the record.

    Args:
        model: the module to replay (unwrapped: no DDP, no compile wrapper).
        target: the module whose forward hooks keep the step (see :func:`capture_target`).
        params: the optimizer's parameters (the replayed backward's inputs).
        names: their names in the layer table (a weight already non-finite is named).
        record: stores the answer (a dict) in the run: the stream's ``meta.json`` entry.
        skips_nonfinite: whether a guard leaves the weights unchanged at a non-finite step.
        loss: the loss function's name (its autograd node), once known.
        late: learn of a step only at the next one, as on a GPU (tests use it on the CPU).
    """

    def __init__(self, model: nn.Module, target: nn.Module, params: list[torch.Tensor], names: list[str],
                 record: Callable[[dict[str, Any]], None], skips_nonfinite: Callable[[], bool], *,
                 loss: Callable[[], str | None] = lambda: None,
                 late: bool | None = None, keep_grad_bytes: int = KEEP_GRAD_BYTES):
        self.model, self.params, self.names, self._record = model, params, names, record
        self._skips = skips_nonfinite
        self._loss = loss
        self.device = params[0].device if params else torch.device("cpu")
        self.late = self.device.type != "cpu" if late is None else late
        self.keep_grad_bytes = keep_grad_bytes
        self.root = f"({type(model).__name__})"
        self.forwards: list[Capture] = []
        self.pending: collections.deque[Pending] = collections.deque()
        self.dropped = 0  # forwards beyond MAX_FORWARDS in the current step
        self.replaying = False
        self.done = False
        #: The answer, once localised (also written to the run).
        self.result: dict[str, Any] | None = None
        self.exchanged = False
        #: The first step whose gradient norm overflowed float32 while every gradient was finite.
        self.norm_overflow: int | None = None
        self._host = torch.zeros(SLOTS, dtype=torch.bool, pin_memory=self.device.type == "cuda")
        self._host_np = self._host.numpy()  # a view of the same host memory, read without dispatch  # sync-ok
        self._next_slot = 0
        self._events = [torch.cuda.Event() for _ in range(SLOTS)] if self.device.type == "cuda" else []
        self._dev = self.device.type if self.device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
        self._handles = [target.register_forward_pre_hook(self._pre, with_kwargs=True),
                         target.register_forward_hook(self._post)]
        self._on_model = target is model  # not a compile wrapper: its children can be watched instead
        self._children = False  # watching the model's children (its own forward was not called)
        self._seen_model = False  # the model's own forward was seen in some step
        self._missed = 0  # steps with gradients and no forward of the model

    # -- keeping the step (every step: references and host calls only) --------------------------

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict, prefix: str | None = None) -> None:
        if self.replaying or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return
        if len(self.forwards) >= MAX_FORWARDS:
            self.dropped += 1
            return
        dev = self._dev
        cuda_rng = torch.cuda.get_rng_state(self.device) if dev == "cuda" else None
        versions = [(t, t._version) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        self.forwards.append(Capture(args, dict(kwargs), torch.get_rng_state(), cuda_rng,
                                     (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)),
                                     module.training if prefix else self.model.training, versions, prefix=prefix))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.replaying or torch.compiler.is_compiling() or not self.forwards or self.forwards[-1].outputs_seen:
            return
        cap = self.forwards[-1]
        cap.outputs_seen = True
        leaves = (output,) if isinstance(output, torch.Tensor) else tree_leaves(output)  # one tensor: skip the walk
        outs = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        cap.grads = [None] * len(outs)
        for i, t in enumerate(outs):
            t.register_hook(functools.partial(cap.keep_grad, i, self.keep_grad_bytes))

    def _watch_children(self) -> None:
        """A step with gradients went by without the model's own forward: the training step calls its
        parts (a LightningModule's ``training_step`` calling ``self.net(x)``). Keep the forwards of
        the model's direct children from now on, each replayed as the submodule it is."""
        self._children = True
        children = list(self.model.named_children())
        if not children or len(children) > MAX_FORWARDS:  # a ModuleList of layers run by hand: too many hooks a step
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        for name, child in children:
            self._handles.append(child.register_forward_pre_hook(functools.partial(self._child_pre, name),
                                                                 with_kwargs=True))
            self._handles.append(child.register_forward_hook(self._post))

    def _child_pre(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pre(module, args, kwargs, prefix=name)

    def drop_step(self) -> None:
        """A step GradScaler skipped (an overflow it handles itself): forget its forwards."""
        self.forwards, self.dropped = [], 0

    @torch.no_grad()
    def at_step(self, step: int, norms: list[torch.Tensor], ignore: torch.Tensor | None = None) -> None:
        """Step ``step``'s gradients are final (its ``norms``, per parameter group, on the device) and
        its update has not happened. Flag it; resolve the flags that have reached the host."""
        if self.done:
            return
        forwards, dropped = self.forwards, self.dropped
        self.forwards, self.dropped = [], 0
        self._seen_model = self._seen_model or len(forwards) > 0  # a list: no device value
        if not forwards and not self._children and not self._seen_model and self._on_model:
            self._missed += 1  # two in a row: under `gradwatch run` the hooks go on inside the first step
            if self._missed >= 2:
                self._watch_children()
        self.poll(step)
        if self.done or not norms:
            return
        if (self._dev == "cpu" and not self.late and ignore is None and not self.pending
                and all(n.dtype in (torch.float32, torch.float64) and n.device.type == "cpu" for n in norms)):
            # CPU tensors are host memory already: read them in place (numpy, no dispatch), which is
            # several times cheaper than reducing them into a flag with torch ops.
            if all(np.isfinite(n.numpy()).all() for n in norms):  # sync-ok: CPU memory, nothing to wait for
                return  # healthy: what it kept is dropped with it
            self._resolve_bad(Pending(step, forwards, -1, None, dropped), step)
            return
        flag = torch.isfinite(norms[0] if len(norms) == 1 else torch.cat(norms)).all()  # True: healthy
        if ignore is not None:
            flag = flag | (ignore != 0).any()  # GradScaler's found_inf: an overflow it handles itself
        if len(self.pending) >= SLOTS:  # the host is SLOTS steps ahead of the device: wait for the oldest
            if self.pending[0].event is not None:
                self.pending[0].event.synchronize()  # sync-ok: only SLOTS steps ahead, where the queue would block
            self.poll(step)
            if self.done:
                return
        slot = self._next_slot
        self._next_slot = (slot + 1) % SLOTS
        self._host[slot].copy_(flag, non_blocking=True)
        event = None
        if flag.device.type == "cuda":
            event = self._events[slot]  # one per slot, made once: a slot is reused only once its step resolved
            event.record()
        pending = Pending(step, forwards, slot, event, dropped)
        if event is None and not self.late:
            self._resolve(pending, step)  # host memory: known now, before the update
        else:
            self.pending.append(pending)

    def poll(self, step: int, wait: bool = False) -> None:
        """Resolve the flags that have reached the host (``wait``: all of them; at a flush or the end,
        which wait for the device anyway). ``step``: the first step whose update has not been applied."""
        while self.pending and not self.done:
            p = self.pending[0]
            if p.event is not None:
                if wait:
                    p.event.synchronize()  # sync-ok: at a flush or the end only
                elif not p.event.query():
                    break
            self.pending.popleft()
            self._resolve(p, step)

    def _resolve(self, p: Pending, step: int) -> None:
        if self._host_np[p.slot]:  # sync-ok: host memory the copy (or its event) has completed
            return  # healthy: what it kept is dropped with it
        self._resolve_bad(p, step)

    def _resolve_bad(self, p: Pending, step: int) -> None:
        if p.step == step and all(bool(torch.isfinite(x.grad).all()) for x in self.params  # sync-ok: bad step
                                  if x.grad is not None):
            # Finite gradients whose float32 norm overflowed: no non-finite value yet; stay armed.
            self.norm_overflow = p.step if self.norm_overflow is None else self.norm_overflow
            return
        # The weights that made step p.step: still in place before its update, or kept by a guard that
        # skipped it, if no later update has been applied since.
        self.localise(p, p.step == step or (self._skips() and step == p.step + 1))

    # -- the replay ------------------------------------------------------------------------------

    def localise(self, p: Pending, intact: bool) -> None:
        """Find where step ``p.step``'s non-finite value came from, record it, and disarm."""
        result: dict[str, Any] = {"step": p.step, "module": None, "samples": None, "op": None,
                                  "replayed": False, "replay_note": None}
        if len(p.forwards) > 1:
            result["forwards"] = len(p.forwards)
        if self.norm_overflow is not None:
            result["norm_overflow_step"] = self.norm_overflow
        notes: list[str] = []
        self.replaying = True
        try:
            bad = [i for i, w in enumerate(self.params) if not bool(torch.isfinite(w).all())]  # sync-ok: bad step
            if bad:
                result["weights_nonfinite"] = [self.names[i] if i < len(self.names) else f"param.{i}" for i in bad[:10]]
            found = self._search(p, intact, result, notes)
            if found is None:
                notes.append(self._nothing_found(p, result["replayed"]) or "")
        except Exception as e:  # a failed replay must not stop training
            notes.append(f"the replay failed ({type(e).__name__}: {e})")
        finally:
            self.replaying = False
        result["replay_note"] = next((n for n in notes if n), None)
        self.result = result
        try:
            self._record(result)
        except Exception as e:  # the record is not worth the run
            print(f"gradwatch: could not record where the first NaN came from ({type(e).__name__}: {e}).",
                  file=sys.stderr)
        self.disarm()

    def _search(self, p: Pending, intact: bool, result: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
        """Each kept forward in turn, replayed (or, with the weights gone, its batch checked) until one
        shows where the value came from; that answer merged into ``result``."""
        # The model's parts called by the training step: a part whose input is already non-finite while
        # the parts before it made finite outputs got it from the training step's own code between them.
        later = next((c for c in p.forwards[1:] if c.prefix and check_inputs(c) is not None), None)
        if later is not None:
            seen = check_inputs(later) or {}
            between = {"before": later.prefix, "samples": seen.get("samples"), "value": seen.get("value"),
                       "batch": seen.get("batch")}
        for i, cap in enumerate(p.forwards):
            if cap is later:
                result.update(between)
                return between
            if overwritten(cap):
                notes.append("the kept batch was overwritten in place before it could be replayed "
                             "(a loader that reuses its buffers)")
                continue
            if intact:
                model = self.model.get_submodule(cap.prefix) if cap.prefix else self.model
                found = replay_forward(model, cap, self.params, self.device, cap.prefix or self.root, self._loss(),
                                       cap.prefix)
                result["replayed"] = True
            else:
                found = check_inputs(cap) or {}
                notes.append(WHY_LATE.format(step=p.step))
            if later is not None and found.get("module") is None and (found.get("op") or {}).get("loss"):
                result.update(between)  # the part's output gradient came back non-finite from that code
                return between
            if found.get("note"):
                notes.append(found.pop("note"))
            if found.get("module") is not None or found.get("op") is not None:
                rows = found.get("samples")
                if rows is not None and len(rows) > MAX_SAMPLES:
                    found.update(samples=rows[:MAX_SAMPLES], samples_total=len(rows))
                result.update(found)
                if len(p.forwards) > 1:
                    result["forward"] = i
                return found
        return None

    def _nothing_found(self, p: Pending, replayed: bool) -> str | None:
        if not p.forwards:
            return (f"no forward of the model ({type(self.model).__name__}) with gradients on was seen in step {p.step} "
                    "(a model compiled in place, the first two steps of a training step that calls the model's "
                    "parts rather than the model, or the first step under `gradwatch run`, before its hooks were on)")
        if p.dropped:
            return f"only the first {MAX_FORWARDS} forwards of step {p.step} were kept, and they stayed finite"
        if replayed:
            return ("the replay stayed finite: the non-finite value came from outside the model's forward and "
                    "backward (a gradient norm past float32's range, another loss, or a nondeterministic kernel)")
        return None

    # -- data parallel: rank 0 records every rank's answer -------------------------------------------

    def exchange(self, window_nonfinite: bool, step: int) -> None:
        """After a window summed over the ranks (every rank calls this at the same flush): once the
        window holds a non-finite step, every rank resolves its flags and rank 0 records all answers."""
        if self.exchanged or not window_nonfinite:
            return
        import torch.distributed as dist

        self.poll(step, wait=True)
        answers: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(answers, self.result)
        ranks = [dict(a, rank=r) for r, a in enumerate(answers) if a is not None]
        if not ranks:
            return  # e.g. a norm past float32's range, no non-finite value yet: again at the next such window
        self.exchanged = True  # on every rank alike: they all gathered the same answers
        first = next((a for a in ranks if a.get("module") is not None or a.get("op") is not None), ranks[0])
        try:
            self._record({**first, "ranks": ranks})
        except Exception as e:
            print(f"gradwatch: could not record the ranks' answers ({type(e).__name__}: {e}).", file=sys.stderr)

    def disarm(self) -> None:
        """Take the hooks off and drop everything kept: the rest of the run costs nothing."""
        self.done = True
        for h in self._handles:
            h.remove()
        self._handles = []
        self.forwards, self.pending = [], collections.deque()

    def close(self, step: int) -> None:
        """The end of the stream (``step`` steps taken): resolve what is still in flight."""
        if not self.done:
            try:
                self.poll(step, wait=True)
            except Exception as e:  # the end of a run must not fail for it
                print(f"gradwatch: forensics could not finish ({type(e).__name__}: {e}).", file=sys.stderr)
        self.disarm()


def arm(stream: Any, raw: nn.Module | None, model: nn.Module | None, params: list[torch.Tensor], names: list[str],
        record: Callable[[dict[str, Any]], None], late: bool | None = None) -> str | None:
    """Arm forensics on a :class:`~gradwatch.torch_stream.TorchStream` (``params``: its optimizer's;
    its guards are asked at a non-finite step); ``raw`` is the model as given (a compile wrapper whose
    call starts the forward). Returns why forensics cannot work there, or None."""
    from .guards.skip import SkipNonFinite

    why = "no model was given" if model is None else unsupported(model, params)
    if why is None:
        def skips() -> bool:
            return stream.guards is not None and any(isinstance(g, SkipNonFinite) for g in stream.guards.guards)

        stream.forensics = Forensics(model, capture_target(raw, model), params, names, record, skips,  # type: ignore[arg-type]
                                     loss=lambda: stream.model_facts.get("loss"), late=late)
    return why


def window_nonfinite(layer_values: dict[str, np.ndarray]) -> bool:
    """Whether a (host) window shows a non-finite gradient."""
    flags = layer_values.get("grad_nonfinite")
    return flags is not None and bool(np.nan_to_num(flags, nan=0.0).max(initial=0.0) > 0)  # sync-ok: numpy
