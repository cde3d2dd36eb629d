"""The Keras half of :class:`gradwatch.treatment.Treatment`: remedies applied from outside to an
unmodified Keras 3 script, on any backend, the Keras way (what ``gradwatch doctor`` tries there).

* ``clip_norm`` sets the optimizer's ``global_clipnorm``, ``clip_value`` its ``clipvalue``. Keras
  applies only one of its clipping options, so the one set clears the script's others (the log
  says which);
* ``scale_lr`` scales the learning rate (a variable is assigned; a schedule or a callable is
  wrapped so that every value it gives is scaled); ``weight_decay`` sets ``weight_decay``.
  These four act on each Keras optimizer as it is constructed: before it is built or applies
  anything (Keras reads them when it traces the step);
* ``set_optimizer`` replaces the optimizer given to ``Model.compile`` (an instance or a name) by
  ``keras.optimizers.<Name>(learning_rate=lr)``, and the ``keras.optimizers`` classes a custom loop
  constructs likewise, keeping the script's clipping options;
* ``swap_activation``, ``reinit`` and ``insert_norm`` are :mod:`gradwatch.surgery` on the model,
  once, on the outermost model: at its ``compile`` (the optimizer is not built yet); a model
  compiled before it is built (a subclassed one) at ``fit``, built by a call on the first sample of
  its arrays; a model never compiled (a custom loop) at its first call with data (inside a
  ``tf.function`` trace, lifted out of it with ``tf.init_scope``). A model first built inside a
  trace cannot be reached: the trial is void, with one sentence that says so.

``skip_nonfinite`` and ``rollback`` have no Keras equivalent: :data:`NOT_FOR_KERAS` says what to do
instead. Keras is patched when the script imports it (:class:`gradwatch.trainer_hooks.AfterImport`),
and put back by :meth:`KerasTreatment.uninstall`. This module imports neither Keras nor torch at
module level.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from .errors import GradwatchError

#: Remedies with no Keras equivalent, and what to do instead.
NOT_FOR_KERAS = {
    "skip_nonfinite": "Keras optimizers have no hook to skip a step from outside (gradwatch's SkipNonFinite acts on "
                      "torch optimizers); in a custom loop, skip apply_gradients when keras.ops.isfinite fails on a "
                      "gradient, and look for the cause of the NaN",
    "rollback": "Keras optimizers have no rollback (gradwatch's Rollback acts on torch optimizers); keep checkpoints "
                "(keras.callbacks.BackupAndRestore or ModelCheckpoint) and resume from the last good one with a "
                "smaller learning rate",
}
#: set_optimizer's names (lower case) -> the class in ``torch.optim`` and in ``keras.optimizers``.
OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop", "adagrad": "Adagrad"}
OPTION_ACTIONS = {"clip_norm", "clip_value", "scale_lr", "weight_decay"}
SURGERY_ACTIONS = {"swap_activation", "reinit", "insert_norm"}
CLIP_OPTIONS = ("clipnorm", "global_clipnorm", "clipvalue")


def keras_applicable(remedy: dict[str, Any]) -> str | None:
    """None if the remedy can be applied to a Keras script from outside; else what to do instead."""
    return NOT_FOR_KERAS.get(str(remedy.get("action")))


def _describe(remedy: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v}" for k, v in remedy.get("args", {}).items())
    return f"{remedy['action']}({args})"


def _refused(sentence: str) -> BaseException:
    from .treatment import TreatmentRefused  # the runner voids the trial on it

    return TreatmentRefused(sentence)


def _replace(cls: type, name: str, new: Any) -> Callable[[], None]:
    """Set ``cls.name = new``; the returned function puts back what was there (or the inherited one)."""
    had, old = name in cls.__dict__, cls.__dict__.get(name)
    setattr(cls, name, new)

    def undo() -> None:
        if cls.__dict__.get(name) is new:
            if had:
                setattr(cls, name, old)
            else:
                delattr(cls, name)

    return undo


class KerasTreatment:
    """Installs the remedies into Keras (as soon as the script imports it); what was applied goes to
    ``log``, the :class:`~gradwatch.treatment.Treatment`'s."""

    def __init__(self, remedies: list[dict[str, Any]], log: list[str]):
        self.remedies = remedies
        self.log = log
        self._options = [r for r in remedies if r["action"] in OPTION_ACTIONS | set(NOT_FOR_KERAS)]
        self._surgery = [r for r in remedies if r["action"] in SURGERY_ACTIONS]
        swaps = [r.get("args", {}) for r in remedies if r["action"] == "set_optimizer"]
        self._swap = swaps[-1] if swaps else None
        if self._swap is not None and str(self._swap.get("name", "Adam")).lower() not in OPTIMIZER_NAMES:
            raise GradwatchError(f"set_optimizer knows {', '.join(OPTIMIZER_NAMES.values())}; got {self._swap.get('name')!r}.")
        self._imports: Any = None
        self._operated = False  # the surgery is done once, on the first model compiled or called eagerly
        self._building = False
        self._patched = False  # Keras was imported and patched
        self._made: set[int] = set()  # ids of the optimizers set_optimizer made
        self._said: set[str] = set()

    # -- install / uninstall ----------------------------------------------------------------------

    def install(self) -> "KerasTreatment":
        if self._options or self._surgery or self._swap is not None:
            from .trainer_hooks import AfterImport

            # The top package: when it has run, every Keras module is there (and `gradwatch run`'s
            # own Keras hooks watch submodules: one finder per module name answers).
            self._imports = AfterImport({"keras": self._patch})
            self._imports.__enter__()
        return self

    def uninstall(self) -> None:
        if self._imports is not None:
            self._imports.__exit__(None, None, None)
            self._imports = None
            if self._surgery and self._patched and not self._operated:
                print(f"gradwatch: {', '.join(map(_describe, self._surgery))} was not applied: no Keras model was "
                      "compiled, or called outside a compiled function (a JAX loop's stateless_call is not seen).",
                      file=sys.stderr)

    def _patch(self, keras: Any) -> Callable[[], None]:
        from keras.src.models.model import Model
        from keras.src.optimizers.base_optimizer import BaseOptimizer

        undo: list[Callable[[], None]] = []
        self._patched = True

        def undo_all() -> None:
            while undo:
                undo.pop()()

        try:
            if self._options:
                undo.append(_replace(BaseOptimizer, "__init__", self._wrap_init(BaseOptimizer.__init__)))
            if self._swap is not None:
                undo += self._swap_classes(keras)
            if self._swap is not None or self._surgery:
                undo.append(_replace(Model, "compile", self._wrap_compile(Model.compile)))
            if self._surgery:
                undo.append(_replace(Model, "__call__", self._wrap_call(Model.__call__)))
                undo.append(_replace(Model, "fit", self._wrap_fit(Model.fit)))
        except BaseException:
            undo_all()
            raise
        return undo_all

    # -- optimizer options: at each optimizer's construction ----------------------------------------

    def _wrap_init(self, original: Any) -> Any:
        treatment = self

        @functools.wraps(original)
        def __init__(opt: Any, *args: Any, **kwargs: Any) -> None:
            original(opt, *args, **kwargs)
            if type(opt).__name__ != "LossScaleOptimizer":  # it passes the gradients to its inner one, treated
                treatment._set_options(opt)

        return __init__

    def _set_options(self, opt: Any) -> None:
        name = type(opt).__name__
        for r in self._options:
            a, args = r["action"], r.get("args", {})
            if a in NOT_FOR_KERAS:
                if a not in self._said:
                    self._said.add(a)
                    print(f"gradwatch: {_describe(r)} is not applied to keras {name}: {NOT_FOR_KERAS[a]}.", file=sys.stderr)
                continue
            try:
                what = set_option(opt, a, args)
            except (TypeError, ValueError, AttributeError) as e:
                raise _refused(f"{_describe(r)} could not be set on keras {name} ({type(e).__name__}: {e})") from None
            self.log.append(f"{_describe(r)} on keras {name} at its construction: {what}")

    # -- set_optimizer ------------------------------------------------------------------------------

    def _target(self) -> tuple[type, dict[str, Any]]:
        from keras.src import optimizers

        args = dict(self._swap or {})
        cls = getattr(optimizers, OPTIMIZER_NAMES[str(args.pop("name", "Adam")).lower()])
        if "lr" in args:
            args["learning_rate"] = float(args.pop("lr"))
        return cls, args

    def _make(self, clips: dict[str, Any]) -> tuple[Any, str]:
        """The named optimizer, with the script's clipping options ``clips``; and how to say it."""
        cls, options = self._target()
        kept = {k: v for k, v in clips.items() if v is not None}
        opt = cls(**options, **kept)
        self._made.add(id(opt))
        return opt, f"{cls.__name__}({', '.join(f'{k}={v}' for k, v in options.items())})" + \
            (f" (kept {', '.join(f'{k}={v}' for k, v in kept.items())})" if kept else "")

    def _swap_classes(self, keras: Any) -> list[Callable[[], None]]:
        """Each ``keras.optimizers`` class the script can construct makes the named optimizer instead
        (the public module only: Keras' own code keeps its classes)."""
        from keras.src.optimizers.base_optimizer import BaseOptimizer

        treatment, module, undo = self, keras.optimizers, []
        for attr in dir(module):
            cls = getattr(module, attr)
            if (not isinstance(cls, type) or not issubclass(cls, BaseOptimizer)
                    or attr in ("Optimizer", "LossScaleOptimizer")):
                continue

            def stand_in(original: type) -> type:
                class Swapped:
                    """Makes the optimizer set_optimizer names (a real one: the backend's own class)."""

                    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
                        opt, made = treatment._make({k: kwargs.get(k) for k in CLIP_OPTIONS})
                        treatment.log.append(f"keras {original.__name__}(...) -> {made}")
                        return opt

                Swapped.__name__ = Swapped.__qualname__ = original.__name__
                return Swapped

            setattr(module, attr, stand_in(cls))
            undo.append(lambda attr=attr, cls=cls: setattr(module, attr, cls))
        return undo

    def _compile_optimizer(self, given: Any) -> Any:
        if id(given) in self._made:
            return given  # the custom loop's swapped one
        if getattr(given, "inner_optimizer", None) is not None:
            self.log.append(f"set_optimizer left the compiled {type(given).__name__} alone (it wraps "
                            f"{type(given.inner_optimizer).__name__})")
            return given
        new, made = self._make({k: getattr(given, k, None) for k in CLIP_OPTIONS})
        was = f"'{given}'" if isinstance(given, str) else type(given).__name__
        self.log.append(f"model.compile(optimizer={was}) -> {made}")
        return new

    # -- compile and first call: surgery, and the compiled optimizer ---------------------------------

    def _wrap_compile(self, original: Any) -> Any:
        treatment = self

        @functools.wraps(original)
        def compile(model: Any, *args: Any, **kwargs: Any) -> Any:
            if treatment._swap is not None:
                if args:
                    args = (treatment._compile_optimizer(args[0]), *args[1:])
                else:
                    kwargs["optimizer"] = treatment._compile_optimizer(kwargs.get("optimizer", "rmsprop"))
            if treatment._surgery and not treatment._operated and model.built:
                treatment._operate(model)  # else at its first eager call, once built
            return original(model, *args, **kwargs)

        return compile

    def _wrap_call(self, original: Any) -> Any:
        treatment = self

        @functools.wraps(original)
        def __call__(model: Any, *args: Any, **kwargs: Any) -> Any:
            if treatment._operated or treatment._building or _symbolic(args, kwargs):
                return original(model, *args, **kwargs)
            traced = _traced(args, kwargs)
            if traced == "a tf.function" and model.built:
                import tensorflow as tf

                with tf.init_scope():  # eagerly, once: the trace that follows sees the changed model
                    treatment._operate(model)
                return original(model, *args, **kwargs)
            if traced:
                raise _refused(f"{model.name} is first called inside {traced}, before it is built, so its layers "
                               "cannot be changed from outside; give it a keras.Input, or call it once on a batch before")
            if not model.built:
                treatment._build(model, args, kwargs)
            running = getattr(model, "train_function", None)
            treatment._operate(model)
            if running is not None:  # inside fit (torch: the first step's forward): it calls the changed model
                model.train_function = running
            return original(model, *args, **kwargs)

        return __call__

    def _wrap_fit(self, original: Any) -> Any:
        """A model compiled before it was built: built from the first sample of fit's arrays, then
        operated on, before fit traces its step (elsewhere its first call comes inside the trace)."""
        treatment = self

        @functools.wraps(original)
        def fit(model: Any, *args: Any, **kwargs: Any) -> Any:
            x = args[0] if args else kwargs.get("x")
            if treatment._surgery and not treatment._operated and not model.built and _is_arrays(x):
                from keras import tree

                treatment._build(model, (tree.map_structure(lambda a: a[:1], x),), {})
                treatment._operate(model)
            result = original(model, *args, **kwargs)
            if treatment._surgery and not treatment._operated:  # e.g. JAX: the traced step calls no __call__
                raise _refused(f"{model.name} was not built before fit traced its training step, so its layers "
                               "could not be changed from outside; give it a keras.Input, or call it once on a batch before fit")
            return result

        return fit

    def _build(self, model: Any, args: Any, kwargs: Any) -> None:
        """A first call builds the layers the surgery acts on; its output is dropped."""
        self._building = True
        try:
            model(*args, **{**kwargs, "training": False})
        finally:
            self._building = False

    def _operate(self, model: Any) -> None:
        self._operated = True
        try:
            for r in self._surgery:
                self.log += operate(model, r)
        except (GradwatchError, ImportError) as e:
            raise _refused(f"{type(model).__name__} {model.name!r}: {e}") from None


def operate(model: Any, remedy: dict[str, Any]) -> list[str]:
    """One surgery remedy on a Keras model (swap_activation's ``init``: a reinit after the swap);
    returns the reports, as the log says them."""
    from . import surgery

    a, args = remedy["action"], remedy.get("args", {})
    if a == "swap_activation":
        extra = {k: v for k, v in args.items() if k not in ("from", "to", "init")}
        done = [surgery.swap_activations(model, args.get("from", "Sigmoid"), args.get("to", "ReLU"), **extra)]
        if args.get("init"):
            done.append(surgery.reinit(model, args["init"]))
    elif a == "reinit":
        done = [surgery.reinit(model, args.get("scheme", "glorot_uniform"), bias=args.get("bias", 0.0))]
    else:
        done = [surgery.insert_norm(model, args.get("kind", "batch"))]
    return [str(report) for report in done]


def _leaves(args: Any, kwargs: Any) -> list[Any]:
    from keras import tree

    return [x for x in tree.flatten((list(args), dict(kwargs)))]


def _is_arrays(x: Any) -> bool:
    """Arrays or tensors (or a list or dict of them), which fit slices into batches; not a dataset."""
    from keras import tree

    leaves = tree.flatten(x) if x is not None else []
    return bool(leaves) and all(hasattr(a, "shape") and hasattr(a, "__getitem__") and len(a.shape) for a in leaves)


def _symbolic(args: Any, kwargs: Any) -> bool:
    """Shape inference, no training: a call on KerasTensors (a functional model's definition) or in
    Keras' symbolic scope (``compute_output_spec``: on torch with meta or filler tensors, whose
    errors it swallows, and in a stateless scope where no assignment lasts)."""
    from keras import KerasTensor
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope

    return in_symbolic_scope() or any(isinstance(x, KerasTensor) for x in _leaves(args, kwargs))


def _traced(args: Any, kwargs: Any) -> str:
    """What traces the call (a tf.function, or JAX on traced values), or ``""`` when it runs eagerly."""
    if "tensorflow" in sys.modules and not sys.modules["tensorflow"].executing_eagerly():
        return "a tf.function"
    jax = sys.modules.get("jax")
    traced = jax is not None and any(isinstance(x, jax.core.Tracer) for x in _leaves(args, kwargs))
    return "a JAX trace (jax.jit)" if traced else ""


def set_option(opt: Any, action: str, args: dict[str, Any]) -> str:
    """Apply one optimizer-option remedy to the Keras optimizer ``opt``; returns what it set."""
    if action in ("clip_norm", "clip_value"):
        key, value = ("global_clipnorm", args.get("max_norm", 1.0)) if action == "clip_norm" else \
            ("clipvalue", args.get("value", 5.0))
        replaced = [f"{k}={getattr(opt, k)}" for k in CLIP_OPTIONS if k != key and getattr(opt, k, None) is not None]
        for k in CLIP_OPTIONS:
            setattr(opt, k, None)
        setattr(opt, key, float(value))
        return f"{key}={float(value):g}" + (f" (replacing its {', '.join(replaced)})" if replaced else "")
    if action == "weight_decay":
        old = opt.weight_decay
        opt.weight_decay = float(args.get("l2", 1e-2))
        return f"weight_decay={opt.weight_decay:g}" + (f" (was {old:g})" if old else "")
    return _scale_lr(opt, float(args.get("factor", 0.1)))


def _scale_lr(opt: Any, factor: float) -> str:
    """Scale the optimizer's learning rate: a variable in place, a schedule or callable wrapped."""
    from keras import ops
    from keras.optimizers.schedules import LearningRateSchedule

    lr = getattr(opt, "_learning_rate", None)  # what the optimizer keeps: a variable, a schedule or a callable
    if isinstance(lr, LearningRateSchedule):
        opt.learning_rate = scaled_schedule(lr, factor)
        return f"its {type(lr).__name__} schedule times {factor:g}"
    if callable(lr) and not hasattr(lr, "assign"):
        opt.learning_rate = lambda: lr() * factor
        return f"its learning-rate function times {factor:g}"
    old = float(ops.convert_to_numpy(opt.learning_rate))
    opt.learning_rate = old * factor
    return f"learning_rate {old:g} -> {old * factor:g}"


_SCALED: dict[str, type] = {}


def scaled_schedule(schedule: Any, factor: float) -> Any:
    """``schedule`` with every learning rate it gives times ``factor`` (a Keras LearningRateSchedule)."""
    if "cls" not in _SCALED:
        from keras.optimizers.schedules import LearningRateSchedule

        class Scaled(LearningRateSchedule):
            def __init__(self, schedule: Any, factor: float):
                self.schedule, self.factor = schedule, factor

            def __call__(self, step: Any) -> Any:
                return self.schedule(step) * self.factor

            def get_config(self) -> dict[str, Any]:
                try:
                    inner = self.schedule.get_config()
                except NotImplementedError:
                    inner = {}
                return {"schedule": type(self.schedule).__name__, "schedule_config": inner, "factor": self.factor}

        Scaled.__name__ = Scaled.__qualname__ = "ScaledSchedule"
        _SCALED["cls"] = Scaled
    return _SCALED["cls"](schedule, factor)
