"""One PyTorch optimizer under watch: a *stream* of the run.

A :class:`TorchStream` owns what recording one optimizer takes: its probe (statistics on the device,
flushed as host windows), its guards, its step hooks, and the torch-specific parts of a step —
``step(closure)``, AMP's scale and skipped steps, a failure that must not stop training. The
:class:`gradwatch.watch.Watch` holds one per optimizer and the run around them.

Also here: who records which optimizer (:func:`claim`), so that ``gradwatch run``'s global hooks
stand down where a watch or a trainer callback records already.
"""

from __future__ import annotations

import math
import platform
import sys
import traceback
import weakref
from typing import Any, Callable

import torch
from torch import nn

from . import amp, shutdown
from .forensics import window_nonfinite
from .guards.base import GuardChain, GuardSetup, GuardStep, GuardStop, say_to_stderr
from .probe.torch import ProbeConfig, TorchProbe
from .store import Chunk, LayerInfo
from .torch_step import StepCall


class TorchStream:
    """One optimizer under watch: its probe, guards and hook handles, and the state of its step.

    Every entry point that runs during training catches its own errors: a monitor must never stop
    training, so a failure stops this stream (see :meth:`fail`) and training goes on. The one
    exception that passes is :class:`~gradwatch.guards.GuardStop`: a guard stopping the run on purpose.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, stream: Any, params: list[torch.Tensor],
                 layers: list[LayerInfo], config: ProbeConfig, on_window: Callable[[TorchStream, Chunk], None], *,
                 model: nn.Module | None = None, tap_targets: Any = None, loss: str | None = None,
                 own_loss: bool = False, reduce_ranks: bool = True, quiet: bool = False):
        self.optimizer = optimizer
        #: Where the windows are stored (a ``StreamWriter``; a stand-in on ranks that do not write).
        self.stream = stream
        self.probe = TorchProbe(params, layers, config, lambda chunk: on_window(self, chunk), model=model,
                                tap_targets=tap_targets)
        self.probe.reduce_ranks = reduce_ranks
        self.guards: GuardChain | None = None
        self.guard_step: GuardStep | None = None
        self.handles: list[Any] = []
        #: Who hooked and claimed the optimizer (see :meth:`claim`), or None.
        self.owner: Any = None
        self.failed = False
        self.store_failed: str | None = None  # why the run could not be written (data parallel only)
        #: Facts about the model written into the stream's meta.json entry once known (the order in
        #: which the layers ran, the loss function), so diagnosis can read them from the stored run.
        self.model_facts: dict[str, Any] = {} if loss is None else {"loss": loss}
        self.facts_written: dict[str, Any] = {}
        self.facts_final = False
        #: Whether the loss ``gradwatch run`` captures at backward() is this stream's (a trainer
        #: callback logs its own loss instead).
        self.takes_staged_loss = not own_loss
        #: Where in torch's step() call the optimizer is (closures, nested steps).
        self.call = StepCall(optimizer, quiet)
        #: The last step this stream has stored (-1: none yet).
        self.stored_through = -1
        #: Where the first non-finite value came from (:func:`gradwatch.forensics.arm`), or None when off.
        self.forensics: Any = None

    # -- what the session asks (gradwatch.session.Stream) ------------------------------------------

    @property
    def index(self) -> int:
        return self.stream.index

    @property
    def steps(self) -> int:
        return self.probe.step

    @property
    def reduces(self) -> bool:
        return self.probe.reducer is not None

    def flush(self, reduce: bool) -> None:
        self.probe.flush(reduce=reduce)

    def note_loss(self, name: str | None) -> None:
        """Remember the loss function's name (the first one seen wins)."""
        if name and "loss" not in self.model_facts:
            self.model_facts["loss"] = name

    # -- a step, between backward() and the update -----------------------------------------------

    def before_step(self, staged_loss: torch.Tensor | None, staged_fn: str | None) -> None:
        """Queue this step's statistics (with the loss ``gradwatch run`` captured for it), note AMP's
        part, and run the guards."""
        if self.failed:
            return
        with shutdown.critical:
            try:
                self._probe_step(staged_loss, staged_fn)
                inputs = self.probe.step_inputs
                scaler = amp.scaler_for(self.optimizer)
                grad_scale = None
                if scaler is not None:
                    grad_scale = self._record_amp(scaler)
                    if grad_scale is not None:
                        grad_scale = grad_scale.detach().reshape(()).to(self.probe.device, torch.float32)
                        # A fused optimizer unscales inside its kernel: guards judge unscaled norms.
                        inputs = inputs.unscaled(grad_scale)
                if self.forensics is not None:  # before the guards: the gradients as backward left them
                    found = getattr(self.optimizer, "found_inf", None) if scaler is not None else None
                    self.forensics.at_step(self.probe.step - 1, self.probe.step_norms,
                                           found if isinstance(found, torch.Tensor) else None)
                if self.guards is not None:
                    self._run_guards(inputs, grad_scale)
            except GuardStop:
                raise  # a guard gave up on purpose: the training loop must stop, with its message
            except Exception as e:
                self.fail(e)

    def _run_guards(self, inputs: Any, grad_scale: torch.Tensor | None) -> None:
        assert self.guards is not None
        step = self.guards.before_step(self.probe.step - 1, inputs, grad_scale)
        self.guard_step = step
        if step is None:
            return
        try:
            r = self.guards.record(step)
            self.probe.record_guards(r.norm_after, r.coef, r.threshold, r.skipped, step.rolled_back)
        except Exception:
            self.guards.abort(step)  # e.g. take back a skip flag handed to a fused optimizer
            self.guard_step = None
            raise

    def _probe_step(self, staged_loss: torch.Tensor | None, staged_fn: str | None) -> None:
        if staged_loss is not None:
            # The function that made the loss names it either way; its value is the stream's own
            # only when no trainer callback logs one.
            self.note_loss(staged_fn)
            if self.takes_staged_loss:
                self.probe.stage_loss(staged_loss)
        groups = self.optimizer.param_groups
        self.probe.on_before_optimizer_step(groups[0].get("lr") if groups else None)

    def _record_amp(self, scaler: Any) -> torch.Tensor | None:
        """GradScaler is stepping this optimizer: record its scale and (fused optimizers) its inf flag;
        return the scale the gradients still carry, if they do."""
        opt = self.optimizer
        fused = bool(getattr(opt, "_step_supports_amp_scaling", False))
        grad_scale = getattr(opt, "grad_scale", None) if fused else None
        found = getattr(opt, "found_inf", None) if fused else None
        scaled = isinstance(grad_scale, torch.Tensor)
        self.probe.record_amp(amp.scale_of(scaler), found if isinstance(found, torch.Tensor) else False,
                              grads_scaled=scaled)
        return grad_scale if scaled else None

    def amp_skipped(self, scaler: Any, staged_loss: torch.Tensor | None, staged_fn: str | None) -> None:
        """GradScaler found inf/NaN in the gradients and did not call optimizer.step(): a step all the
        same (its statistics show where the overflow was), marked as skipped by AMP."""
        if self.failed:
            return
        with shutdown.critical:
            try:
                if self.forensics is not None:
                    self.forensics.drop_step()
                self._probe_step(staged_loss, staged_fn)
                self.probe.record_amp(amp.scale_of(scaler), True)
                self.probe.on_after_optimizer_step()
            except Exception as e:
                self.fail(e)

    def after_step(self) -> None:
        if self.failed:
            return
        with shutdown.critical:
            try:
                if self.guards is not None:
                    step, self.guard_step = self.guard_step, None
                    self.guards.after_step(step)  # first: the update size is of the step as it stands
                self.probe.on_after_optimizer_step()
            except Exception as e:
                self.fail(e)

    def record_clipping(self, threshold: float | None, after: torch.Tensor | None, measured: bool) -> None:
        """A clipping the framework did itself, at the step just recorded (see
        :meth:`gradwatch.watch.Watch.record_clipping`). Device tensors only."""
        if self.failed or self.guards is not None:
            return
        try:
            with torch.no_grad():
                probe = self.probe
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
            self.fail(e)

    def fail(self, error: Exception) -> None:
        """Keep what was recorded, stop this stream, say why. The failed step was not committed, so
        ``probe.step`` is the number of the step that failed."""
        self.failed = True
        try:
            self.probe.flush(reduce=False)  # this rank alone: no collective the others would not join
        except Exception:
            pass
        guards = " and its guards are off" if self.guards is not None else ""
        print(
            f"gradwatch: stopped recording {type(self.optimizer).__name__} at step {self.probe.step}{guards} "
            f"after an internal error ({type(error).__name__}: {error}); training continues. "
            "Please report this with the traceback below.",
            file=sys.stderr,
        )
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)

    # -- windows and notes -----------------------------------------------------------------------

    def store(self, chunk: Chunk, where: Any) -> None:
        """Append a flushed window to the run. Data parallel: a rank whose store fails keeps computing
        (the other ranks go on reducing with it; its guards too) and only stops writing."""
        if self.store_failed is None:
            try:
                self.stream.append(chunk)
            except Exception as e:
                if self.probe.reducer is None:
                    raise  # one process: the stream stops (see fail), training goes on
                self.store_failed = f"{type(e).__name__}: {e}"
                print(f"gradwatch: could not write {where} ({self.store_failed}); recording stops here, "
                      "guards go on.", file=sys.stderr)
        if len(chunk):
            self.stored_through = int(chunk.steps[-1])

    def new_model_facts(self, layer_ids: list[str]) -> dict[str, Any] | None:
        """The host-side facts the diagnosis reads (execution order, loss function) when they have
        changed since last written, else None; nothing here touches the device."""
        if self.facts_final:
            return None
        facts = dict(self.model_facts)
        order = self.probe.execution_order
        if order:
            facts["execution_order"] = [layer_ids[i] for i in order]
        if order is not None and "loss" in facts:
            self.facts_final = True  # both known: nothing more to learn at later windows
        if facts == self.facts_written:
            return None
        self.facts_written = facts
        return facts

    def notes(self, rank: int) -> tuple[dict[str, Any], list[str]]:
        """What this stream could not record, and why: (meta.json fields, lines to print)."""
        fields: dict[str, Any] = {}
        lines: list[str] = []
        if self.guards is not None:
            try:
                summary = self.guards.summaries()
                fields["guard_summary"] = summary
                events = [e for g in self.guards.guards for e in getattr(g, "events", [])]
                if events:
                    fields["rollbacks"] = events
            except Exception as e:  # a summary must not cost the record
                summary = [f"could not summarise the guards ({type(e).__name__}: {e})"]
            lines.extend(summary)
        if self.probe.local_windows:
            spans = ", ".join(f"{a}-{b}" for a, b in self.probe.local_windows)
            fields["local_statistics"] = (
                f"steps {spans}: rank {rank}'s own statistics, not summed over the ranks "
                "(the run ended on this rank alone, or the process group had ended)")
        note = self.probe.activation_note
        if note is not None:
            fields["activation_stats"] = f"off: {note}"
            lines.append(f"activation statistics are off: {note}.")
        return fields, lines

    def claim(self, owner: Any) -> None:
        """Hook the optimizer's step for ``owner`` (a watch's :meth:`~gradwatch.watch.Watch.step_pre_hook`
        and ``step_post_hook``) and claim it (see :func:`claim`)."""
        self.handles.append(self.optimizer.register_step_pre_hook(owner.step_pre_hook))
        self.handles.append(self.optimizer.register_step_post_hook(owner.step_post_hook))
        claim(self.optimizer, owner)
        self.owner = owner

    def detach(self) -> None:
        """Remove this stream's hooks and claim; the optimizer and model are left as they were."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.forensics is not None:
            self.forensics.close(self.probe.step)
        self.probe.remove_hooks()
        if self.owner is not None:
            release(self.optimizer, self.owner)

    def on_window(self, chunk: Chunk, where: Any, layer_ids: list[str] | None,
                  update_meta: Callable[[dict[str, Any]], None]) -> None:
        """A flushed window: store it, note what it says about the model (``layer_ids``: the
        stream's layers, when this process writes), let the guards decide what waits for the host."""
        self.store(chunk, where)
        if self.forensics is not None and not self.forensics.done:
            self.forensics.poll(self.probe.step)  # a step that reached the host: before the diagnosis reads it
        facts = self.new_model_facts(layer_ids) if layer_ids is not None else None
        if facts:
            try:
                update_meta(facts)
            except Exception as e:  # a fact is not worth a run: say so, record on
                print(f"gradwatch: could not record the model's layer order ({type(e).__name__}: {e}).",
                      file=sys.stderr)
        if self.forensics is not None and self.probe.last_flush_reduced and not self.failed:
            self.forensics.exchange(window_nonfinite(chunk.layer_values), self.probe.step)
        if self.guards is not None:
            self.guards.on_window(chunk)

    def guard_with(self, guards: list[Any], model: nn.Module | None, layers: list[LayerInfo],
                   params: list[torch.Tensor], quiet: bool) -> None:
        """Run ``guards`` at every step of this stream, between backward and the update."""
        setup = GuardSetup(self.optimizer, model, layers, params, self.probe.device, say_to_stderr(quiet),
                           reduce_norms=self.probe.reduce_step_norms)
        self.guards = GuardChain(guards, setup)
        self.probe.keep_step_inputs = True


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


# ------------------------------------------------------------------- what meta.json says


def framework_info() -> dict[str, Any]:
    """What meta.json says about the framework and machine a PyTorch run was recorded with."""
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


def jsonable_options(d: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's ``defaults`` as meta.json can hold them (anything else as its repr)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
            out[k] = list(v)
        else:
            out[k] = repr(v)
    return out
