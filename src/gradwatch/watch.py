"""`gradwatch.watch`: attach to a PyTorch training loop, record, detach.

A :class:`Watch` is the PyTorch side of a run (:class:`gradwatch.session.RunSession` holds the run
directory and its lifecycle): one probe per optimizer (a *stream*), its guards and AMP's part. It
hooks each optimizer's step (``register_step_pre_hook`` / ``register_step_post_hook``); the runner
and the trainer callbacks drive the same entry points from their own hook points.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import sys
import traceback
import weakref
from dataclasses import asdict
from typing import Any, Sequence

import torch
from torch import nn

from . import amp, shutdown
from .session import RunSession, live_sessions, status_for
from .session import DEFAULT_ROOT, default_out  # noqa: F401  (their old home: gradwatch.watch.default_out)
from .errors import GradwatchError
from .guards.base import Guard, GuardChain, GuardSetup, GuardStep, GuardStop, as_guard_list, say_to_stderr
from .probe.distributed import process_rank
from .probe.torch import ProbeConfig, TorchProbe, build_layer_table
from .store import Chunk, LayerInfo, StreamWriter

#: Autograd nodes that only rescale or copy a loss (``loss / accumulate_grad_batches`` in Lightning
#: and the HF Trainer, ``loss * weight``): the loss function is the node below them.
_SCALING_NODES = ("DivBackward", "MulBackward", "CloneBackward", "ToCopyBackward")


def loss_node(loss: Any) -> str | None:
    """The autograd node that produced a loss tensor (``MseLossBackward0``, ``NllLossBackward0``):
    names the loss function for the diagnosis. A rescaling by a constant is looked through. Python
    attributes only: no device read."""
    node = getattr(loss, "grad_fn", None) if isinstance(loss, torch.Tensor) else None
    for _ in range(4):
        if node is None or not type(node).__name__.startswith(_SCALING_NODES):
            break
        inputs = [f for f, _ in getattr(node, "next_functions", ()) if f is not None]
        if len(inputs) != 1:  # a product or quotient of two graphs: not a plain rescaling
            break
        node = inputs[0]
    return type(node).__name__ if node is not None else None


def framework_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": "torch",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["device_name"] = torch.cuda.get_device_name()
    return info


class _Attached:
    """One optimizer under watch: its probe and its hook handles (the probe writes to its stream)."""

    def __init__(self, optimizer: torch.optim.Optimizer, stream: StreamWriter):
        self.optimizer = optimizer
        self.stream = stream
        self.probe: TorchProbe = None  # type: ignore[assignment]  # set right after
        self.guards: GuardChain | None = None
        self.guard_step: GuardStep | None = None
        self.handles: list[Any] = []
        self.failed = False
        self.store_failed: str | None = None  # why the run could not be written (data parallel only)
        #: Facts about the model written into the stream's meta.json entry once known (the order in
        #: which the layers ran, the loss function), so diagnosis can read them from the stored run.
        self.model_facts: dict[str, Any] = {}
        self.facts_written: dict[str, Any] = {}
        self.facts_final = False
        #: Whether the loss the runner captures at backward() is this stream's (a trainer callback
        #: logs its own loss instead).
        self.takes_staged_loss = True
        #: optimizer.step(closure): "waiting" until the closure has computed this step's gradients.
        self.closure_state: str | None = None
        self.closure_said = False
        #: The frame of torch's hooked step() this stream is inside (see Watch.step_pre_hook).
        self.step_frame: Any = None
        #: The last step this stream has stored (-1: none yet).
        self.stored_through = -1


def unwrap_model(model: nn.Module | None) -> nn.Module | None:
    """The user's module inside DistributedDataParallel / torch.compile wrappers (same parameters),
    so layers keep their own module paths (``0.weight``, not ``module.0.weight`` or ``_orig_mod.0.weight``)."""
    seen = 0
    while model is not None and seen < 8:
        seen += 1
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel) or isinstance(model, nn.DataParallel):
            model = model.module
            continue
        break
    return model


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _current_lr(optimizer: torch.optim.Optimizer) -> float | torch.Tensor | None:
    groups = optimizer.param_groups
    return groups[0].get("lr") if groups else None


class Watch(RunSession):
    """Records per-layer gradient and weight statistics of a PyTorch training run.

    Args:
        model: the model whose parameters the optimizer trains; names the layers by module path.
            May be None (layers are then named ``param.N``).
        optimizer: one optimizer or a list of them (e.g. a GAN's two); each becomes a stream.
        out: the run directory (default ``gradwatch-runs/run-TIME``).
        flush_every: steps per device->host copy and store append.
        sample_every: steps between full statistics (mean, std, max |g|, zero fraction, histogram,
            weights, update ratio); the gradient norm is recorded every step.
        overwrite: replace a run already in ``out`` instead of refusing.
        quiet: print nothing.
        diagnose_online: diagnose the stored windows during the run and print each new problem
            once, the moment it is found; the full diagnosis is written at the end either way.
        report: write ``report.html`` at the end (default: yes, unless the environment sets
            ``GRADWATCH_REPORT=0``).
        tensorboard: also write TensorBoard event files of the run into this directory at the end
            (needs the ``tensorboard`` extra).
        guards: fixes applied at every step between backward and the optimizer step, in order
            (:mod:`gradwatch.guards`: ``ClipNorm(1.0)``, ``SkipNonFinite()``, ``ZClip()``, ...).
            Each optimizer gets its own copy after the first.
        attach_later: start without an optimizer (and without checking the model's parameters);
            integrations add each optimizer with :meth:`add_optimizer` once their framework has made it.
        summary: print the end-of-run summary (sparklines and findings) when closing; default: yes,
            except with ``attach_later`` (``gradwatch run`` prints a fuller one itself).

    Use it as a context manager (hooks attach on enter and detach on exit), or call
    :meth:`attach` and :meth:`close` yourself.
    """

    nothing_recorded = (
        "gradwatch: no optimizer step was watched, so nothing was recorded "
        "(gradwatch records at torch.optim.Optimizer.step() and Keras' optimizer.apply(); "
        "a 'not recording' line above says why an optimizer was left out).")

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        out: str | os.PathLike[str] | None = None,
        *,
        flush_every: int = 50,
        sample_every: int = 50,
        overwrite: bool = False,
        quiet: bool = False,
        diagnose_online: bool = True,
        report: bool | None = None,
        tensorboard: str | os.PathLike[str] | None = None,
        guards: Sequence[Guard] | Guard | None = None,
        attach_later: bool = False,
        summary: bool | None = None,
    ):
        if model is not None and not isinstance(model, nn.Module):
            raise GradwatchError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        optimizers = _as_optimizer_list(optimizer)
        if not optimizers and not attach_later:
            raise GradwatchError(
                "watch() needs the optimizer: gradwatch reads gradients just before optimizer.step(); "
                "pass watch(model, optimizer)."
            )
        if model is not None and not attach_later and not any(True for _ in model.parameters()):
            raise GradwatchError(f"the model ({type(model).__name__}) has no parameters; there is nothing to watch.")
        model = unwrap_model(model)
        self.config = ProbeConfig(flush_every=flush_every, sample_every=sample_every)
        super().__init__(out, overwrite=overwrite, quiet=quiet, diagnose_online=diagnose_online, report=report,
                         tensorboard=tensorboard, summary=(not attach_later) if summary is None else summary,
                         options=asdict(self.config), framework=framework_info, rank=process_rank)
        self._guards = as_guard_list(guards)
        # Fresh copies for further optimizers, taken before the first stream's guards hold any state.
        self._guard_templates = copy.deepcopy(self._guards)
        self.model = model
        self._optimizers = optimizers
        #: Whether every rank runs this watch, so statistics are summed over ranks at each flush
        #: (integrations that record on rank 0 only turn it off).
        self.reduce_ranks = True
        amp.install(_amp_listener)  # GradScaler.step tells us the steps it skips
        _flush_before_destroy()  # a script's destroy_process_group() must not strand the last window
        self._attached: dict[int, _Attached] = {}
        self._last: _Attached | None = None
        self._staged_loss: torch.Tensor | None = None
        self._staged_loss_fn: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "Watch":
        self.attach()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.close(status="stopped" if isinstance(exc, GuardStop) else status_for(exc))

    def attach(self) -> "Watch":
        """Hook every optimizer given at construction."""
        for opt in self._optimizers:
            self.add_optimizer(opt, self.model)
        return self

    @property
    def _reduces(self) -> bool:
        """Whether any stream sums its windows over data-parallel ranks."""
        return any(a.probe.reducer is not None for a in self._attached.values())

    def add_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        *,
        hooks: bool = True,
        label: str | None = None,
        layer_table: tuple[list[LayerInfo], list[torch.Tensor]] | None = None,
        tap_targets: Sequence[Any] | None = None,
        loss: str | None = None,
        reduce_ranks: bool | None = None,
        own_loss: bool = False,
    ) -> _Attached:
        """Start a stream for ``optimizer``; with ``hooks``, register its step hooks.

        ``label`` names the stream (e.g. the model's variable name); it prefixes layer names only
        when two streams would otherwise share a name. ``layer_table`` (layers, parameters) replaces
        the one built from module paths (Keras names its variables itself). ``tap_targets``
        (:class:`~gradwatch.probe.torch.TapTarget`) replaces the Linear/Conv modules whose outputs the
        activation tap reads; ``loss`` names the loss function when the framework knows it (else it
        is read from the logged loss tensor's autograd node). ``reduce_ranks`` overrides the watch's
        own setting for this stream; ``own_loss`` says the caller logs this stream's loss itself
        (a trainer callback), so the loss ``gradwatch run`` captures at ``backward()`` is not used.

        Without ``hooks`` the caller drives the stream (:meth:`step_pre_hook` and
        :meth:`step_post_hook`, or :meth:`on_before_optimizer_step` and
        :meth:`on_after_optimizer_step`); with them, the watch claims the optimizer (see
        :func:`claim`), so that ``gradwatch run``'s global hooks leave it to this watch.
        """
        if self._closed:
            raise GradwatchError("this watch is closed; start a new gradwatch.watch(...) to record again.")
        key = id(optimizer)
        if key in self._attached:
            return self._attached[key]
        params = _optimizer_params(optimizer)
        model = unwrap_model(model)
        if model is not None and layer_table is None:
            # Layers in the model's order (input side first, as the gradient-flow profile reads);
            # frozen parameters (in no optimizer) ride along in the first stream; parameters the
            # model does not own come last.
            in_opt = {id(p) for p in params}
            first = not self._attached
            ordered = [p for p in model.parameters() if id(p) in in_opt or (first and not p.requires_grad)]
            owned = {id(p) for p in ordered}
            params = ordered + [p for p in params if id(p) not in owned]
        if not params:
            raise GradwatchError(
                f"the optimizer {type(optimizer).__name__} has no parameters; there is nothing to watch."
            )
        layers, params = layer_table if layer_table is not None else build_layer_table(model, params)
        writer = self._ensure_writer()
        stream = writer.add_stream(
            layers,
            {
                "optimizer": type(optimizer).__name__,
                "model": type(model).__name__ if model is not None else None,
                "defaults": _jsonable(optimizer.defaults),
            },
            label=label,
        )
        if self._guards:
            stream_info = writer.streams[stream.index]
            stream_info["guards"] = [g.describe() for g in self._guards]
            writer.update_meta()
        att = _Attached(optimizer, stream)
        att.probe = TorchProbe(params, layers, self.config, lambda chunk: self._on_window(att, chunk), model=model,
                               tap_targets=tap_targets)
        if loss is not None:
            att.model_facts["loss"] = loss
        att.probe.reduce_ranks = self.reduce_ranks if reduce_ranks is None else reduce_ranks
        att.takes_staged_loss = not own_loss
        if self._guards:
            # The first optimizer uses the guard objects given (so their counters can be read back).
            guards = self._guards if not self._attached else copy.deepcopy(self._guard_templates)
            setup = GuardSetup(optimizer, model, layers, params, att.probe.device, say_to_stderr(self.quiet),
                               reduce_norms=att.probe.reduce_step_norms)
            att.guards = GuardChain(guards, setup)
            att.probe.keep_step_inputs = True
        if hooks:
            att.handles.append(optimizer.register_step_pre_hook(self.step_pre_hook))
            att.handles.append(optimizer.register_step_post_hook(self.step_post_hook))
            claim(optimizer, self)
        self._attached[key] = att
        return att

    def stream(self, optimizer: Any) -> _Attached | None:
        """The stream recording ``optimizer`` (its ``probe``, ``guards``, ``optimizer``), or None."""
        att = self._attached.get(id(optimizer))
        return att if att is not None and att.optimizer is optimizer else None

    def watches(self, optimizer: Any) -> bool:
        """Whether this watch records ``optimizer`` (a stream was started for it and is still recording)."""
        att = self._attached.get(id(optimizer))
        return att is not None and att.optimizer is optimizer and not att.failed and not self._closed

    def note_loss_function(self, optimizer: Any, loss: Any) -> None:
        """Name the loss function of ``optimizer``'s stream from a loss tensor that still has its
        autograd graph (see :func:`loss_node`); the first name wins. A Python attribute: no device read."""
        att = self._attached.get(id(optimizer))
        if att is not None and "loss" not in att.model_facts:
            self._note_loss(att, loss_node(loss))

    def record_clipping(self, optimizer: Any, threshold: float | None, *, after: torch.Tensor | None = None,
                        measured: bool = True) -> None:
        """Record a clipping that the framework did itself (Lightning's ``gradient_clip_val``, the HF
        Trainer's ``max_grad_norm``, Keras' ``clipnorm``), at the step just recorded: ``grad_norm_clipped``
        (``after``, or the norm of the gradients as they are now, which must be the clipped ones),
        ``clip_coef`` and ``clip_threshold`` (None: the clipping has no single norm threshold).
        ``measured=False``: the step was recorded after the clipping already, so the norm before it is
        unknown. Device tensors only; a stream with guards records theirs instead."""
        att = self._attached.get(id(optimizer))
        if att is None or att.failed or self._closed or att.guards is not None:
            return
        try:
            with torch.no_grad():
                probe = att.probe
                raw = probe.last_global_norm()
                limit = torch.full((), math.nan if threshold is None else float(threshold), device=probe.device)
                if not measured:
                    probe.record_guards(raw, torch.full((), math.nan, device=probe.device), limit, False, False)
                    return
                if after is None:
                    after = probe.current_grad_norm()
                if after is not None:
                    probe.record_guards(after, after / raw, limit, False, False)
        except Exception as e:  # a monitor must never stop training
            self._fail(att, e)

    def last_global_norm(self, optimizer: Any) -> torch.Tensor | None:
        """The global gradient norm of ``optimizer``'s step just recorded, a 0-d device tensor (no host
        read), or None if the stream is not recording."""
        att = self._attached.get(id(optimizer))
        if att is None or att.failed:
            return None
        return att.probe.last_global_norm()

    def describe_stream(self, optimizer: Any, **fields: Any) -> None:
        """Add ``fields`` to ``optimizer``'s stream entry in meta.json: where and how its steps are
        recorded (a trainer's recording point, clipping the script does itself)."""
        att = self._attached.get(id(optimizer))
        if att is None:
            return
        try:
            self._update_stream(att.stream.index, fields)
        except Exception as e:  # a note in meta.json is not worth a failed run
            print(f"gradwatch: could not note {', '.join(fields)} in meta.json ({type(e).__name__}: {e}).", file=sys.stderr)

    # -- torch step hooks (a watch's own, and the runner's global ones) ------------------------------

    def step_pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> Any:
        """A torch optimizer step pre-hook. A plain ``step()``: record now. ``step(closure)`` (LBFGS,
        Lightning, any closure loop): the gradients do not exist yet — the closure computes them
        inside the step — so the closure is wrapped and the step is recorded right after its
        first call returns, before the optimizer uses them; the closure's loss is the step's."""
        att = self._attached.get(id(optimizer))
        if att is None or att.failed or self._closed:
            return None
        if att.step_frame is not None and _frame_is_active(att.step_frame):
            # A step() inside this optimizer's step(): a subclass calling super().step(), when torch
            # has hooked both classes' step. The outer call records it, once.
            return None
        att.step_frame = _torch_step_frame()
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            att.closure_state = None
            self.on_before_optimizer_step(optimizer)
            return None
        att.closure_state = "waiting"

        def closure_then_record(*a: Any, **k: Any) -> Any:
            result = closure(*a, **k)
            if att.closure_state == "waiting":
                att.closure_state = "recorded"
                if isinstance(result, torch.Tensor) and result.numel() == 1 and result.is_floating_point():
                    self.stage_loss(result.detach(), loss_node(result))
                with torch.no_grad():
                    self.on_before_optimizer_step(optimizer)
            return result

        if len(args) > 1:
            return (args[0], closure_then_record, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_record}

    def step_post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        """A torch optimizer step post-hook (see :meth:`step_pre_hook`)."""
        att = self._attached.get(id(optimizer))
        if att is None or att.failed or self._closed:
            return
        if att.step_frame is not None and _torch_step_frame() is not att.step_frame:
            return  # the end of a nested step() (see step_pre_hook)
        att.step_frame = None
        if att.closure_state == "waiting":  # the optimizer was given a closure and never called it
            att.closure_state = None
            if not att.closure_said and not self.quiet:
                att.closure_said = True
                print(f"gradwatch: {type(optimizer).__name__}.step(closure) returned without calling its "
                      "closure, so its gradients were never computed at a point gradwatch could read; "
                      "such steps are not recorded.", file=sys.stderr)
            return
        att.closure_state = None
        self.on_after_optimizer_step(optimizer)

    # -- hook points (per-instance hooks and the runner's global hooks both land here) ------------

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        att = self._attached[id(optimizer)]
        if att.failed:
            return
        self._last = att
        with shutdown.critical:
            try:
                self._probe_step(att)
                inputs = att.probe.step_inputs
                scaler = amp.scaler_for(optimizer)
                grad_scale = None
                if scaler is not None:
                    grad_scale = self._record_amp(att, scaler)
                    if grad_scale is not None:
                        grad_scale = grad_scale.detach().reshape(()).to(att.probe.device, torch.float32)
                        # A fused optimizer unscales inside its kernel: guards judge unscaled norms.
                        inputs = inputs.unscaled(grad_scale)
                if att.guards is not None:
                    step = att.guards.before_step(att.probe.step - 1, inputs, grad_scale)
                    att.guard_step = step
                    if step is not None:
                        try:
                            r = att.guards.record(step)
                            att.probe.record_guards(r.norm_after, r.coef, r.threshold, r.skipped, step.rolled_back)
                        except Exception:
                            att.guards.abort(step)  # e.g. take back a skip flag handed to a fused optimizer
                            att.guard_step = None
                            raise
            except GuardStop:
                raise  # a guard gave up on purpose: the training loop must stop, with its message
            except Exception as e:
                self._fail(att, e)

    def _probe_step(self, att: _Attached) -> None:
        """Queue this step's statistics, with the loss the runner captured for it."""
        if self._staged_loss is not None:
            # The function that made the loss names it either way; its value is the stream's own
            # only when no trainer callback logs one.
            self._note_loss(att, self._staged_loss_fn)
            if att.takes_staged_loss:
                att.probe.stage_loss(self._staged_loss)
            self._staged_loss = None
        att.probe.on_before_optimizer_step(_current_lr(att.optimizer))

    def _record_amp(self, att: _Attached, scaler: Any) -> torch.Tensor | None:
        """GradScaler is stepping this optimizer: record its scale and (fused optimizers) its inf flag;
        return the scale the gradients still carry, if they do."""
        opt = att.optimizer
        fused = bool(getattr(opt, "_step_supports_amp_scaling", False))
        grad_scale = getattr(opt, "grad_scale", None) if fused else None
        found = getattr(opt, "found_inf", None) if fused else None
        scaled = isinstance(grad_scale, torch.Tensor)
        att.probe.record_amp(amp.scale_of(scaler), found if isinstance(found, torch.Tensor) else False, grads_scaled=scaled)
        return grad_scale if scaled else None

    def _record_amp_skip(self, att: _Attached, scaler: Any) -> None:
        """GradScaler found inf/NaN in the gradients and did not call optimizer.step(): a step all the
        same (its statistics show where the overflow was), marked as skipped by AMP."""
        if att.failed or self._closed:
            return
        self._last = att
        with shutdown.critical:
            try:
                self._probe_step(att)
                att.probe.record_amp(amp.scale_of(scaler), True)
                att.probe.on_after_optimizer_step()
            except Exception as e:
                self._fail(att, e)

    def on_after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        att = self._attached[id(optimizer)]
        if att.failed:
            return
        with shutdown.critical:
            try:
                if att.guards is not None:
                    step, att.guard_step = att.guard_step, None
                    att.guards.after_step(step)  # first: the update size is of the step as it stands
                att.probe.on_after_optimizer_step()
            except Exception as e:
                self._fail(att, e)

    def _fail(self, att: _Attached, error: Exception) -> None:
        # A monitor must never stop training: keep what was recorded, stop this stream, say why.
        # The failed step was not committed, so probe.step is the number of the step that failed.
        att.failed = True
        try:
            att.probe.flush(reduce=False)  # this rank alone: no collective the others would not join
        except Exception:
            pass
        guards = " and its guards are off" if att.guards is not None else ""
        print(
            f"gradwatch: stopped recording {type(att.optimizer).__name__} at step {att.probe.step}{guards} "
            f"after an internal error ({type(error).__name__}: {error}); training continues. "
            "Please report this with the traceback below.",
            file=sys.stderr,
        )
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)

    # -- windows ------------------------------------------------------------------------------------

    def _on_window(self, att: _Attached, chunk: Chunk) -> None:
        """A flushed window: store it, note what it says about the model, let the guards decide what
        waits for the host, and pass it on (listeners, online diagnosis)."""
        if att.store_failed is None:
            try:
                att.stream.append(chunk)
            except Exception as e:
                if att.probe.reducer is None:
                    raise  # one process: the stream stops (see _fail), training goes on
                # Data parallel: the other ranks go on reducing with this one, so it keeps computing
                # (its guards too) and only stops writing.
                att.store_failed = f"{type(e).__name__}: {e}"
                print(f"gradwatch: could not write {self.out} ({att.store_failed}); recording stops here, "
                      "guards go on.", file=sys.stderr)
        if len(chunk):
            att.stored_through = int(chunk.steps[-1])
        self._record_model_facts(att)
        if att.guards is not None:
            att.guards.on_window(chunk)
        self._pass_window(id(att.optimizer), chunk)

    def _record_model_facts(self, att: _Attached) -> None:
        """Host-side facts the diagnosis reads (execution order, loss function) into meta.json,
        when they change; nothing here touches the device."""
        if att.facts_final or not self.writes:
            return
        facts = dict(att.model_facts)
        order = att.probe.execution_order
        if order:
            ids = self._writer.streams[att.stream.index]["layers"]  # type: ignore[union-attr]
            facts["execution_order"] = [ids[i] for i in order]
        if order is not None and "loss" in facts:
            att.facts_final = True  # both known: nothing more to learn at later windows
        if facts == att.facts_written:
            return
        try:
            self._writer.streams[att.stream.index].update(facts)  # type: ignore[union-attr]
            self._writer.update_meta()  # type: ignore[union-attr]
            att.facts_written = facts
        except Exception as e:  # a fact is not worth a run: say so, record on
            print(f"gradwatch: could not record the model's layer order ({type(e).__name__}: {e}).", file=sys.stderr)
            att.facts_written = facts

    @staticmethod
    def _note_loss(att: _Attached | None, name: str | None) -> None:
        """Remember the loss function's name for the stream (the first one seen wins)."""
        if att is not None and name and "loss" not in att.model_facts:
            att.model_facts["loss"] = name

    def _stored_through(self) -> int:
        """The last step that every stream which has stepped has stored: a GAN's two optimizers flush
        one after the other, and between the two flushes the second one's steps are not stored yet."""
        ends = [a.stored_through for a in self._attached.values() if a.probe.step > 0 and not a.failed]
        return min(ends, default=-1)

    def _several_streams(self) -> bool:
        return len(self._attached) > 1

    def _can_flush_alone(self) -> bool:
        return not self._reduces

    def _flush_streams(self, reduce: bool) -> None:
        self._flush(reduce=reduce)

    def _detach(self) -> None:
        self.detach()

    def _note_streams(self) -> None:
        self._record_guards()
        self._record_notes()

    # -- user calls -------------------------------------------------------------------------------

    def log(self, loss: torch.Tensor | float | None = None) -> None:
        """Record the loss of the latest optimizer step. Tensors stay on the device (no sync).

        Call it after ``optimizer.step()``. With several optimizers the loss goes to the one that
        stepped last.
        """
        if loss is None:
            return
        if not isinstance(loss, torch.Tensor):
            try:
                loss = float(loss)
            except (TypeError, ValueError):
                raise GradwatchError(f"log(loss=...) takes a tensor or a number; got {type(loss).__name__}.") from None
        elif loss.numel() != 1:
            raise GradwatchError(f"log(loss=...) takes a scalar; got a tensor of shape {tuple(loss.shape)}.")
        att = self._last or next(iter(self._attached.values()), None)
        if att is not None:
            if "loss" not in att.model_facts:  # read once, not at every step
                self._note_loss(att, loss_node(loss))
            att.probe.log_loss(loss)

    def stage_loss(self, loss: torch.Tensor, loss_fn: str | None = None) -> None:
        """The runner's loss capture: the loss belongs to the next optimizer step, whichever steps.
        ``loss_fn`` names the function that made it (see :func:`loss_node`)."""
        self._staged_loss = loss
        self._staged_loss_fn = loss_fn

    def flush(self, optimizer: Any = None) -> None:
        """Write every buffered step to the run directory now (one device->host copy per stream);
        with ``optimizer``, only that optimizer's stream.

        Under torch.distributed every rank must call it (it sums the window over the ranks)."""
        self._flush(reduce=True, only=None if optimizer is None else id(optimizer))

    def _flush(self, reduce: bool, only: int | None = None) -> None:
        with shutdown.critical:
            for key, att in self._attached.items():
                if not att.failed and (only is None or key == only):
                    att.probe.flush(reduce=reduce)

    def detach(self) -> None:
        """Remove every hook; the model and optimizers are left as they were."""
        for att in self._attached.values():
            for h in att.handles:
                h.remove()
            att.handles.clear()
            att.probe.remove_hooks()
            release(att.optimizer, self)

    def _record_notes(self) -> None:
        """What a stream could not record, and why, into meta.json (and on stderr unless quiet)."""
        for att in self._attached.values():
            if att.probe.local_windows:
                spans = ", ".join(f"{a}-{b}" for a, b in att.probe.local_windows)
                self._writer.streams[att.stream.index]["local_statistics"] = (  # type: ignore[union-attr]
                    f"steps {spans}: rank {self.rank}'s own statistics, not summed over the ranks "
                    "(the run ended on this rank alone, or the process group had ended)")
            note = att.probe.activation_note
            if note is None:
                continue
            self._writer.streams[att.stream.index]["activation_stats"] = f"off: {note}"  # type: ignore[union-attr]
            if not self.quiet:
                print(f"gradwatch: activation statistics are off: {note}.", file=sys.stderr)

    def _record_guards(self) -> None:
        """What each stream's guards did, into meta.json (and on stderr unless quiet)."""
        for att in self._attached.values():
            if att.guards is None:
                continue
            try:
                lines = att.guards.summaries()
                info = self._writer.streams[att.stream.index]  # type: ignore[union-attr]
                info["guard_summary"] = lines
                events = [e for g in att.guards.guards for e in getattr(g, "events", [])]
                if events:
                    info["rollbacks"] = events
            except Exception as e:  # a summary must not cost the record
                lines = [f"could not summarise the guards ({type(e).__name__}: {e})"]
            if not self.quiet:
                for line in lines:
                    print(f"gradwatch: {line}", file=sys.stderr)

    # -- results ----------------------------------------------------------------------------------

    @property
    def guards(self) -> list[Guard]:
        """The guards given to this watch (each stream runs its own copy)."""
        return list(self._guards)

    @property
    def attached(self) -> bool:
        return bool(self._attached) and not self._closed

    @property
    def steps(self) -> int:
        """Optimizer steps seen so far (the most of any stream)."""
        return max((a.probe.step for a in self._attached.values()), default=0)

#: The code of torch's hooked ``Optimizer.step`` wrapper (one code object for every hooked class).
_STEP_WRAPPER_CODE = torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None).__code__


def _torch_step_frame(limit: int = 8) -> Any:
    """The frame of the hooked ``step()`` that is calling the current hook, or None."""
    frame = sys._getframe(2)
    for _ in range(limit):
        if frame is None or frame.f_code is _STEP_WRAPPER_CODE:
            return frame
        frame = frame.f_back
    return None


def _frame_is_active(target: Any) -> bool:
    """Whether ``target`` is on the current call stack (a step() that raised is not)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame is target:
            return True
        frame = frame.f_back
    return False


# ------------------------------------------------------------------- who records which optimizer

_claims: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def claim(optimizer: Any, owner: Any) -> None:
    """Say that ``owner`` — a watch's own hooks, a trainer callback (on every rank, also where it
    does not write) — records ``optimizer``'s steps, so that ``gradwatch run``'s global optimizer
    hooks stand down for it instead of recording it a second time."""
    _claims[optimizer] = owner


def release(optimizer: Any, owner: Any) -> None:
    """Take back ``owner``'s claim on ``optimizer`` (its recording has ended)."""
    if claimed_by(optimizer) is owner:
        del _claims[optimizer]


def claimed_by(optimizer: Any) -> Any:
    """Who claimed ``optimizer`` (see :func:`claim`), or None."""
    try:
        return _claims.get(optimizer)
    except TypeError:  # not weakly referenceable: no one could have claimed it
        return None


def refuse_rank0_guards(guards: Any, world_size: int, callback: str, framework_clip: str) -> None:
    """Callbacks that record on rank 0 only cannot guard: their guards would change rank 0's gradients
    alone and the replicas would drift apart. With several processes, say what to use instead."""
    if guards and world_size > 1:
        raise GradwatchError(
            f"{callback} records on rank 0 only, so its guards would change rank 0's gradients alone and the "
            f"replicas would drift apart; with several processes use {framework_clip}, or "
            "gradwatch.watch(..., guards=[...]) on every rank in a plain loop.")


def _amp_listener(scaler: Any, optimizer: torch.optim.Optimizer) -> Any:
    """Before a GradScaler step: note each watching stream's step count; after it, a count that did
    not move means the scaler skipped optimizer.step()."""
    targets = [(w, w._attached[id(optimizer)]) for w in live_sessions()
               if isinstance(w, Watch) and id(optimizer) in w._attached]
    if not targets:
        return None
    before = [(w, att, att.probe.step) for w, att in targets]

    def after() -> None:
        for w, att, n in before:
            if att.probe.step == n:
                w._record_amp_skip(att, scaler)

    return after


_destroy_patched = False


def _flush_before_destroy() -> None:
    """Wrap ``torch.distributed.destroy_process_group`` (once) so that every open watch flushes its
    window while the group still exists: the flush sums it over the ranks, and every rank calls
    destroy at the same point of the script. Watches closed after that have nothing left to sum."""
    global _destroy_patched
    if _destroy_patched:
        return
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if not dist.is_available():
        return
    original = dist.destroy_process_group

    def destroy_process_group(group: Any = None, *args: Any, **kwargs: Any) -> Any:
        if group is None or group is dist.group.WORLD:  # both end every group, gradwatch's too
            # Called while an exception propagates (a `finally:` after this rank crashed), the other
            # ranks are not here: this rank's window is flushed as its own, without a reduction.
            alone = sys.exc_info()[0] is not None
            for w in live_sessions():
                if isinstance(w, Watch) and not w._closed and w._reduces:
                    try:
                        w._flush(reduce=not alone)
                    except Exception as e:  # the script's shutdown goes on
                        print(f"gradwatch: could not flush before the process group ended ({type(e).__name__}: {e}).",
                              file=sys.stderr)
        return original(group, *args, **kwargs)

    destroy_process_group.__wrapped__ = original  # type: ignore[attr-defined]
    destroy_process_group.__doc__ = original.__doc__
    dist.destroy_process_group = destroy_process_group
    _destroy_patched = True


def watch(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    out: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Watch:
    """Watch a training run; use as ``with gradwatch.watch(model, optimizer, out=...) as w:``.

    Hooks attach at once, so ``w = watch(...); ...; w.close()`` works too. See :class:`Watch` for
    the options.
    """
    return Watch(model, optimizer, out, **options).attach()


def _as_optimizer_list(optimizer: Any) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    items = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for o in items:
        if not isinstance(o, torch.optim.Optimizer):
            raise GradwatchError(
                f"optimizer must be a torch.optim.Optimizer (or a list of them); got {type(o).__name__}."
            )
    return items


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
            out[k] = list(v)
        else:
            out[k] = repr(v)
    return out
