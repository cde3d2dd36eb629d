"""The runs that :mod:`gradwatch.keras_compiled`'s recorders write into, on TensorFlow and JAX: the
``fit`` callback's (:func:`start`), a custom loop's (:class:`LoopWatch`, behind
:func:`gradwatch.keras.watch`) and ``gradwatch run``'s (:class:`RunnerHooks`); and, on JAX, what
``fit``'s train step hands over besides the gradients (:func:`capture_jax_loss`).
"""

from __future__ import annotations

import sys
from typing import Any

import keras

from .array_stream import ArraySession
from .errors import GradwatchError
from .keras_compiled import BACKEND, Recorder
from .probe import arrays
from .probe.layout import LOSS, LOSS_GIVEN, ProbeConfig


# ------------------------------------------------------------------- JAX: fit's loss


def capture_jax_loss(model: Any, rec: Recorder) -> Any:
    """Under ``fit`` on JAX, put each step's unscaled loss and its forward's activation statistics
    into the ring row its ``apply`` wrote. The forward runs inside ``jax.value_and_grad``, whose
    inner values cannot be used outside it: the statistics leave through its auxiliary output (the
    prediction, wrapped and unwrapped again before the metrics see it), the loss where the train
    step hands it to the metrics; the returned optimizer state gets both. Returns the function that
    undoes it (None when this Keras has no such hand-over)."""
    import jax
    import jax.numpy as jnp

    original_step = model.train_step
    handover = getattr(model, "_update_metrics_variables", None)
    forward = getattr(model, "compute_loss_and_updates", None)
    if handover is None or forward is None:
        return None
    opt_vars = rec.optimizer.variables
    ring_i = next(i for i, v in enumerate(opt_vars) if v is rec.ring)
    iter_i = next(i for i, v in enumerate(opt_vars) if v is rec.optimizer._iterations)
    wrapped = "gradwatch_y_pred"

    def loss_and_updates(*args: Any, **kwargs: Any) -> Any:
        optimizer_variables = kwargs.get("optimizer_variables")
        if not kwargs.get("training") or optimizer_variables is None or not rec._taps:
            return forward(*args, **kwargs)
        rec.jax_sampled = arrays.is_sampled(rec.config, optimizer_variables[iter_i])
        rec.act_stats = {}
        try:
            loss, (unscaled, y_pred, non_trainable, metrics) = forward(*args, **kwargs)
        finally:
            rec.jax_sampled = None
            acts, rec.act_stats = rec.act_stats, {}
        return loss, (unscaled, {wrapped: y_pred, "gradwatch_acts": acts}, non_trainable, metrics)

    def train_step(state: Any, data: Any) -> Any:
        taken: dict[str, Any] = {}

        def update_metrics(metrics_variables: Any, unscaled_loss: Any, x: Any, y: Any, y_pred: Any, *a: Any,
                           **k: Any) -> Any:
            if isinstance(y_pred, dict) and wrapped in y_pred:
                taken["acts"] = y_pred["gradwatch_acts"]
                y_pred = y_pred[wrapped]
            taken["loss"] = unscaled_loss
            return handover(metrics_variables, unscaled_loss, x, y, y_pred, *a, **k)

        model._update_metrics_variables = update_metrics
        model.compute_loss_and_updates = loss_and_updates
        try:
            logs, new_state = original_step(state, data)
        finally:
            del model._update_metrics_variables
            del model.compute_loss_and_updates
        if "loss" not in taken or not rec.active:
            return logs, new_state
        trainable, non_trainable, optimizer_vars, metrics = new_state
        optimizer_vars = list(optimizer_vars)
        ring = optimizer_vars[ring_i]
        r = ((optimizer_vars[iter_i] - 1) % rec.rows).astype(jnp.int32)
        loss = jnp.reshape(jnp.asarray(taken["loss"], jnp.float32), ())
        ring = jax.lax.dynamic_update_slice(ring, loss.reshape(1, 1), (r, jnp.int32(LOSS)))
        ring = jax.lax.dynamic_update_slice(ring, jnp.ones((1, 1), jnp.float32), (r, jnp.int32(LOSS_GIVEN)))
        acts = {int(i): a for i, a in taken.get("acts", {}).items()}
        if acts:
            start = rec.maker.layout.columns("a_dead").start
            block = rec.maker.activation_blocks(acts)
            ring = jax.lax.dynamic_update_slice(ring, block[None, :], (r, jnp.int32(start)))
        optimizer_vars[ring_i] = ring
        return logs, (trainable, non_trainable, optimizer_vars, metrics)

    model.train_step = train_step
    model.make_train_function(force=True)

    def undo() -> None:
        if model.__dict__.get("train_step") is train_step:
            del model.train_step
        model.train_function = None  # the next fit() builds its own again

    return undo


#: What :class:`gradwatch.keras.GradWatch` passes on to the run (the rest of a watch's options are torch's).
_SESSION_OPTIONS = ("overwrite", "quiet", "diagnose_online", "report", "tensorboard", "summary", "log_to")


def framework_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"name": BACKEND, "keras": keras.__version__, "python": platform.python_version(),
                            "platform": platform.platform()}
    if BACKEND == "tensorflow":
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
    else:
        import jax

        info["jax"] = jax.__version__
        info["device_name"] = str(jax.devices()[0].device_kind)
    return info


def session_for(out: Any, options: dict[str, Any]) -> ArraySession:
    """A run for ``options`` (a watch's keyword arguments), or one sentence on what cannot be done here."""
    options = dict(options)
    if options.pop("guards", None):
        raise GradwatchError(f"gradwatch's guards act on torch optimizers; on {BACKEND}, use Keras' clipnorm, "
                             "global_clipnorm or clipvalue.")
    config = ProbeConfig(flush_every=options.pop("flush_every", 50), sample_every=options.pop("sample_every", 50))
    options.pop("forensics", None)  # the replay of a non-finite step is PyTorch's (docs/nan.md): nothing to arm here
    unknown = sorted(set(options) - set(_SESSION_OPTIONS))
    if unknown:
        raise GradwatchError(f"unknown option {unknown[0]!r} for Keras on {BACKEND}; "
                             f"known: flush_every, sample_every, forensics, {', '.join(_SESSION_OPTIONS)}.")
    return ArraySession(out, config=config, framework=framework_info(), **options)


class Attachment:
    """A :class:`Recorder` started by the ``fit`` callback, with what it changed on the model."""

    owner_name = "gradwatch.keras.GradWatch"

    def __init__(self, session: ArraySession, recorder: Recorder, undo: Any):
        self.session = session
        self.recorder = recorder
        self._undo = undo

    def host_step(self, n: int = 1) -> None:
        self.recorder.host_step(n)

    def detach(self) -> None:
        self.recorder.detach()
        if self._undo is not None:
            self._undo()
            self._undo = None

    def abandon(self) -> None:
        """Undo an attachment whose fit() raised, and close its run as crashed."""
        self.detach()
        if not self.session.closed:
            self.session.close(status="crashed")


def retrace(model: Any) -> Any:
    """TensorFlow: ``fit`` builds its step function before the callbacks start, and a model fitted
    before keeps the one it traced then, without gradwatch's ops: build a new one, and let the next
    ``fit`` build its own again. Returns the undo."""
    model.make_train_function(force=True)

    def undo() -> None:
        model.train_function = None

    return undo


def start(model: Any, out: Any, options: dict[str, Any]) -> tuple[ArraySession, Attachment]:
    """A run recording ``model``'s optimizer during ``fit`` (for :class:`gradwatch.keras.GradWatch`)."""
    session = session_for(out, options)
    session.status_at_exit = "crashed"  # closed at exit without on_train_end: fit() raised
    try:
        recorder = Recorder(session, model, model.optimizer, by_callback=True)
        undo = capture_jax_loss(model, recorder) if BACKEND == "jax" else retrace(model)
    except BaseException:
        session.close(status="crashed")
        raise
    return session, Attachment(session, recorder, undo)


class LoopWatch:
    """A custom training loop's Keras optimizer under record (see :func:`gradwatch.keras.watch`): the
    host hears of each step from the loop itself (eager ``apply`` calls, ``tf.function`` calls), or
    from :meth:`step` where it cannot (a JAX loop that calls ``stateless_apply`` in its own jit)."""

    def __init__(self, model: Any, optimizer: Any, out: Any, options: dict[str, Any]):
        self.session = session_for(out, {"summary": not options.get("quiet", False), **options})
        try:
            self.recorder = Recorder(self.session, model, optimizer, by_callback=BACKEND == "jax")
        except BaseException:
            self.session.close(status="crashed")
            raise

    @property
    def out(self) -> Any:
        return self.session.out

    @property
    def findings(self) -> list[Any]:
        return self.session.findings

    @property
    def run(self) -> Any:
        return self.session.run

    def step(self, n: int = 1) -> None:
        """``n`` steps ran (only needed where the loop's steps cannot be seen: JAX)."""
        self.recorder.host_step(n)

    def close(self, status: str = "finished") -> None:
        self.recorder.detach()
        self.session.close(status=status)

    def __enter__(self) -> "LoopWatch":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        from .session import status_for

        self.close(status=status_for(exc))


# ------------------------------------------------------------------- gradwatch run


class RunnerHooks:
    """``gradwatch run`` for Keras on TensorFlow and JAX: each ``fit`` gets a callback recording into
    one run (a stream per optimizer, kept across fits); a TensorFlow custom loop's optimizer is
    recorded from its first ``apply`` on. An optimizer a ``GradWatch`` of the script's own records
    is left to it.

    Args:
        watch: the runner's (PyTorch) watch: where the run goes and its options.
        max_steps: stop the script after this many steps (``gradwatch.global_hooks.StepLimitReached``).
        others: filled with the script's own recorders (id -> owner), to say so at the end.
    """

    def __init__(self, watch: Any, max_steps: int | None, others: dict[int, Any], stop: Any):
        self.watch = watch
        self.max_steps = max_steps
        self.others = others
        self._stop = stop
        self.session: ArraySession | None = None
        self.recorders: dict[int, Recorder] = {}
        self._undo_loss: dict[int, Any] = {}
        self._said_jax_loop = False

    def _session(self) -> ArraySession:
        if self.session is None:
            w = self.watch
            self.session = session_for(w.out, {"flush_every": w.config.flush_every, "sample_every": w.config.sample_every,
                                               "quiet": w.quiet, "report": w.report, "tensorboard": w.tensorboard,
                                               "log_to": w.log_to,
                                               "summary": False, "overwrite": w.overwrite})
        return self.session

    def _own(self, optimizer: Any) -> Recorder | None:
        """This run's recorder of ``optimizer``; None when the script's own GradWatch records it."""
        optimizer = getattr(optimizer, "inner_optimizer", None) or optimizer
        rec = optimizer.__dict__.get("_gradwatch")
        if rec is not None and rec.session is not self.session:
            self.others[id(rec.session)] = rec.session
            return None
        return rec

    def recorder(self, model: Any, optimizer: Any, *, by_callback: bool) -> Recorder | None:
        opt = getattr(optimizer, "inner_optimizer", None) or optimizer
        if opt.__dict__.get("_gradwatch") is not None:
            return self._own(opt)
        rec = Recorder(self._session(), model, opt, by_callback=by_callback)
        rec.after_host_step = self._check_limit
        self.recorders[id(opt)] = rec
        return rec

    def _check_limit(self) -> None:
        if self.max_steps is not None and self.session is not None and self.session.steps >= self.max_steps:
            raise self._stop()

    def on_apply(self, optimizer: Any, variables: Any) -> None:
        """An ``apply`` outside ``fit``: a custom loop's (TensorFlow: recorded from now on)."""
        opt = getattr(optimizer, "inner_optimizer", None) or optimizer
        if opt.__dict__.get("_gradwatch") is not None or id(opt) in self.recorders:
            return
        if BACKEND == "jax":
            if not self._said_jax_loop and not self.watch.quiet:
                print("gradwatch: a JAX custom loop's optimizer steps inside its own jit, where `gradwatch run` cannot "
                      "add its record; use gradwatch.keras.watch(model, optimizer) and w.step() in the loop.",
                      file=sys.stderr)
            self._said_jax_loop = True
            self.recorders[id(opt)] = None  # type: ignore[assignment]
            return
        from .keras import find_keras_model

        try:
            variables = list(variables if variables is not None else opt._trainable_variables)
            model = find_keras_model(variables, opt)
            self.recorder(model, opt, by_callback=False)
        except GradwatchError as e:
            self.recorders[id(opt)] = None  # type: ignore[assignment]
            print(f"gradwatch: not recording {type(opt).__name__}: {e}", file=sys.stderr)
        except Exception as e:  # a monitor must never stop the script it watches; tried once
            self.recorders[id(opt)] = None  # type: ignore[assignment]
            print(f"gradwatch: not recording {type(opt).__name__} after an internal error ({type(e).__name__}: {e}); "
                  "training continues. Please report this.", file=sys.stderr)

    def callback(self) -> Any:
        return _RunnerCallback(self)

    def close(self, status: str) -> ArraySession | None:
        for rec in self.recorders.values():
            if rec is not None:
                rec.detach()
        for undo in self._undo_loss.values():
            undo()
        if self.session is not None:
            self.session.close(status=status)
        return self.session


class _RunnerCallback(keras.callbacks.Callback):
    """The callback ``gradwatch run`` adds to each ``fit`` (see :class:`RunnerHooks`)."""

    def __init__(self, hooks: RunnerHooks):
        super().__init__()
        self.hooks = hooks
        self.rec: Recorder | None = None
        self._per_call = 1

    def on_train_begin(self, logs: Any = None) -> None:
        model = self.model
        if model.optimizer is None:
            return
        try:
            self.rec = self.hooks.recorder(model, model.optimizer, by_callback=True)
            if self.rec is not None:
                self.rec.by_callback = True
                if BACKEND == "jax" and id(model) not in self.hooks._undo_loss:
                    undo = capture_jax_loss(model, self.rec)
                    if undo is not None:
                        self.hooks._undo_loss[id(model)] = undo
        except GradwatchError as e:
            print(f"gradwatch: not recording this fit(): {e}", file=sys.stderr)
            self.rec = None
        self._per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.rec is not None:  # at the start: see gradwatch.keras.GradWatch.on_train_batch_begin
            self.rec.host_step(self._per_call)

    def on_train_end(self, logs: Any = None) -> None:
        if self.rec is not None:
            self.rec.stream.flush()
