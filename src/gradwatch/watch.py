"""`gradwatch.watch`: attach to a PyTorch training loop, record, detach.

A :class:`Watch` is the PyTorch side of a run (:class:`gradwatch.session.RunSession` holds the run
directory and its lifecycle): one probe per optimizer (a *stream*), its guards and AMP's part. It
hooks each optimizer's step (``register_step_pre_hook`` / ``register_step_post_hook``); the runner
and the trainer callbacks drive the same entry points from their own hook points.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import asdict
from typing import Any, Sequence

import torch
from torch import nn

from . import amp
from .forensics import arm as arm_forensics
from .errors import GradwatchError
from .guards.base import Guard, GuardStop, as_guard_list
from .probe.distributed import process_rank
from .probe.layers import build_layer_table, in_model_order, unwrap_model  # noqa: F401  (public here too)
from .probe.torch import ProbeConfig
from .session import DEFAULT_ROOT, RunSession, default_out, live_sessions, status_for  # noqa: F401  (default_out's old home)
from .store import Chunk, LayerInfo
from .torch_step import loss_node
from .torch_stream import TorchStream, claim, claimed_by, framework_info, jsonable_options, release  # noqa: F401

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
            (needs the ``tensorboard`` extra); with ``log_to``'s ``"tensorboard"``, as the run goes.
        log_to: also log every flushed window and each finding, live, to ``"tensorboard"``, ``"wandb"``
            and/or ``"mlflow"``: a name, a comma-separated string, a list, a dict of names to options, or
            :class:`gradwatch.sinks.Sink` objects (docs/integrations.md).
        guards: fixes applied at every step between backward and the optimizer step, in order
            (:mod:`gradwatch.guards`: ``ClipNorm(1.0)``, ``SkipNonFinite()``, ``ZClip()``, ...).
            Each optimizer gets its own copy after the first.
        attach_later: start without an optimizer (and without checking the model's parameters);
            integrations add each optimizer with :meth:`add_optimizer` once their framework has made it.
        summary: print the end-of-run summary (sparklines and findings) when closing; default: yes,
            except with ``attach_later`` (``gradwatch run`` prints a fuller one itself).
        forensics: localise the first non-finite step (the module, op and samples it came from) by
            replaying it; healthy steps only keep references to their inputs (docs/nan.md).

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
        log_to: Any = None,
        guards: Sequence[Guard] | Guard | None = None,
        attach_later: bool = False,
        summary: bool | None = None,
        forensics: bool = True,
    ):
        if model is not None and not isinstance(model, nn.Module):
            raise GradwatchError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if not isinstance(forensics, bool):
            raise GradwatchError(f"forensics must be True or False; got {forensics!r}.")
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
                         tensorboard=tensorboard, log_to=log_to, summary=(not attach_later) if summary is None else summary,
                         options={**asdict(self.config), "forensics": forensics}, framework=framework_info,
                         rank=process_rank)
        self._forensics = forensics
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
        self._streams: dict[int, TorchStream] = {}  # type: ignore[assignment]  # the session's, of torch streams
        self._last: TorchStream | None = None
        self._staged_loss: torch.Tensor | None = None
        self._staged_loss_fn: str | None = None

    @classmethod
    def for_callback(cls, given: Watch | None, callback: str, model: nn.Module | None, out: Any,
                     options: dict[str, Any]) -> Watch:
        """The watch a trainer callback records into: the open one it was ``given``, else a new one
        started with ``attach_later`` (``out`` or ``gradwatch-runs/NAME-TIME``; the summary printed
        unless quiet)."""
        if given is not None:
            if given.closed:
                raise GradwatchError(f"{callback}(watch=...) was given a watch that is closed; give it an open one.")
            return given
        options = {"summary": not options.get("quiet", False), **options}
        return cls(model, out=out, attach_later=True, **options)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Watch:
        self.attach()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.close(status="stopped" if isinstance(exc, GuardStop) else status_for(exc))

    def attach(self) -> Watch:
        """Hook every optimizer given at construction."""
        for opt in self._optimizers:
            self.add_optimizer(opt, self.model)
        return self

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
    ) -> TorchStream:
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
        if key in self._streams:
            return self._streams[key]
        raw, model = model, unwrap_model(model)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not params:
            raise GradwatchError(f"the optimizer {type(optimizer).__name__} has no parameters; there is nothing to watch.")
        if layer_table is None and model is not None:
            params = in_model_order(params, model, with_frozen=not self._streams)
        layers, params = layer_table if layer_table is not None else build_layer_table(model, params)
        stream = self._open_stream(
            layers,
            {
                "optimizer": type(optimizer).__name__,
                "model": type(model).__name__ if model is not None else None,
                "defaults": jsonable_options(optimizer.defaults),
            },
            label=label,
        )
        if self._guards:
            self._update_stream(stream.index, {"guards": [g.describe() for g in self._guards]})
        s = TorchStream(optimizer, stream, params, layers, self.config, self._on_window, model=model,
                        tap_targets=tap_targets, loss=loss, own_loss=own_loss, quiet=self.quiet,
                        reduce_ranks=self.reduce_ranks if reduce_ranks is None else reduce_ranks)
        if self._guards:
            # The first optimizer uses the guard objects given (so their counters can be read back).
            s.guard_with(self._guards if not self._streams else copy.deepcopy(self._guard_templates), model, layers,
                         params, self.quiet)
        if self._forensics and layer_table is None:  # a torch model (Keras names its own variables)
            why = arm_forensics(s, raw, model, params, [x.name for x in layers],
                                lambda f: self._update_stream(s.index, {"forensics": f}))
            self._update_stream(s.index, {"forensics": {"armed": why is None, "replay_note": why}})
        if hooks:
            s.claim(self)
        self._streams[key] = s
        return s

    # -- the integration API: an optimizer's stream ------------------------------------------------

    def stream(self, optimizer: Any) -> TorchStream | None:
        """The stream recording ``optimizer`` (its ``probe``, ``guards``, ``optimizer``), or None."""
        s = self._streams.get(id(optimizer))
        return s if s is not None and s.optimizer is optimizer else None

    def _live_stream(self, optimizer: Any) -> TorchStream | None:
        s = self.stream(optimizer)
        return s if s is not None and not s.failed and not self._closed else None

    def watches(self, optimizer: Any) -> bool:
        """Whether this watch records ``optimizer`` (a stream was started for it and is still recording)."""
        return self._live_stream(optimizer) is not None

    def note_loss_function(self, optimizer: Any, loss: Any) -> None:
        """Name the loss function of ``optimizer``'s stream from a loss tensor that still has its
        autograd graph (see :func:`loss_node`); the first name wins. A Python attribute: no device read."""
        s = self.stream(optimizer)
        if s is not None and "loss" not in s.model_facts:
            s.note_loss(loss_node(loss))

    def record_clipping(self, optimizer: Any, threshold: float | None, *, after: torch.Tensor | None = None,
                        measured: bool = True) -> None:
        """Record a clipping that the framework did itself (Lightning's ``gradient_clip_val``, the HF
        Trainer's ``max_grad_norm``, Keras' ``clipnorm``), at the step just recorded: ``grad_norm_clipped``
        (``after``, or the norm of the gradients as they are now, which must be the clipped ones),
        ``clip_coef`` and ``clip_threshold`` (None: the clipping has no single norm threshold).
        ``measured=False``: the step was recorded after the clipping already, so the norm before it is
        unknown. Device tensors only; a stream with guards records theirs instead."""
        s = self._live_stream(optimizer)
        if s is not None:
            s.record_clipping(threshold, after, measured)

    def last_global_norm(self, optimizer: Any) -> torch.Tensor | None:
        """The global gradient norm of ``optimizer``'s step just recorded, a 0-d device tensor (no host
        read), or None if the stream is not recording."""
        s = self.stream(optimizer)
        return None if s is None or s.failed else s.probe.last_global_norm()

    def describe_stream(self, optimizer: Any, **fields: Any) -> None:
        """Add ``fields`` to ``optimizer``'s stream entry in meta.json: where and how its steps are
        recorded (a trainer's recording point, clipping the script does itself)."""
        s = self.stream(optimizer)
        if s is None:
            return
        try:
            self._update_stream(s.stream.index, fields)
        except Exception as e:  # a note in meta.json is not worth a failed run
            print(f"gradwatch: could not note {', '.join(fields)} in meta.json ({type(e).__name__}: {e}).", file=sys.stderr)

    # -- torch step hooks (a watch's own, and the runner's global ones) ------------------------------

    def step_pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> Any:
        """A torch optimizer step pre-hook. A plain ``step()``: record now. ``step(closure)`` (LBFGS,
        Lightning, any closure loop): the closure is wrapped and the step recorded right after its
        first call has computed the gradients (see :meth:`~gradwatch.torch_step.StepCall.enter`)."""
        s = self._live_stream(optimizer)
        if s is None:
            return None
        return s.call.enter(args, kwargs, lambda: self.on_before_optimizer_step(optimizer), self.stage_loss)

    def step_post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        """A torch optimizer step post-hook (see :meth:`step_pre_hook`)."""
        s = self._live_stream(optimizer)
        if s is not None and s.call.leave():
            self.on_after_optimizer_step(optimizer)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The step's gradients are final and the update has not happened: record, run the guards."""
        s = self._streams[id(optimizer)]
        if not s.failed:
            s.before_step(*self._take_staged_loss(s))

    def on_after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The update has happened: its size, the guards' after-step part, the step is committed."""
        self._streams[id(optimizer)].after_step()

    def _amp_skipped(self, s: TorchStream, scaler: Any) -> None:
        if not s.failed and not self._closed:
            s.amp_skipped(scaler, *self._take_staged_loss(s))

    def _take_staged_loss(self, s: TorchStream) -> tuple[torch.Tensor | None, str | None]:
        """The loss the runner captured for the step ``s`` is taking now (it stepped last)."""
        self._last = s
        staged, self._staged_loss = self._staged_loss, None
        return staged, self._staged_loss_fn

    # -- windows ------------------------------------------------------------------------------------

    def _on_window(self, s: TorchStream, chunk: Chunk) -> None:
        """A flushed window of ``s``: the stream stores it, then it is passed on (listeners, online
        diagnosis)."""
        info = self._stream_info(s.index) if self.writes else None
        s.on_window(chunk, self.out, info["layers"] if info is not None else None,
                    lambda facts: self._update_stream(s.index, facts))
        self._pass_window(id(s.optimizer), chunk)

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
        s = self._last or next(iter(self._streams.values()), None)
        if s is not None:
            if "loss" not in s.model_facts:  # read once, not at every step
                s.note_loss(loss_node(loss))
            s.probe.log_loss(loss)

    def stage_loss(self, loss: torch.Tensor, loss_fn: str | None = None) -> None:
        """The runner's loss capture: the loss belongs to the next optimizer step, whichever steps.
        ``loss_fn`` names the function that made it (see :func:`loss_node`)."""
        self._staged_loss = loss
        self._staged_loss_fn = loss_fn

    def detach(self) -> None:
        """Remove every hook; the model and optimizers are left as they were."""
        self._detach()

    # -- results ----------------------------------------------------------------------------------

    @property
    def guards(self) -> list[Guard]:
        """The guards given to this watch (each stream runs its own copy)."""
        return list(self._guards)

    @property
    def attached(self) -> bool:
        return bool(self._streams) and not self._closed

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
    targets = [(w, w.stream(optimizer)) for w in live_sessions() if isinstance(w, Watch)]
    before = [(w, s, s.probe.step) for w, s in targets if s is not None]
    if not before:
        return None

    def after() -> None:
        for w, s, n in before:
            if s.probe.step == n:
                w._amp_skipped(s, scaler)

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
                if isinstance(w, Watch) and not w.closed and not w._can_flush_alone():
                    try:
                        w._flush_streams(reduce=not alone)
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
