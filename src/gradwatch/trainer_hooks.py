"""``gradwatch run``'s hooks into the frameworks whose trainers run the optimizer step themselves.

Each is installed when the script imports the framework's module (:class:`AfterImport`), so that a
script that never imports Keras, Lightning or transformers pays nothing for them:

* :class:`KerasHooks`: Keras optimizers are not torch ones, so their ``apply`` is wrapped;
* :class:`TrainerHooks`: a Lightning or Hugging Face ``Trainer`` gets gradwatch's callback when it is
  built — the global optimizer hooks would see Lightning's gradients one step late and the
  Trainer's after its clipping.
"""

from __future__ import annotations

import functools
import importlib.machinery
import sys
from typing import Any

from .errors import GradwatchError
from .watch import Watch, claimed_by


class AfterImport:
    """Runs ``patch(module)`` for each named module as soon as it is imported (at once if it is
    already): a meta-path finder wraps the module's ``exec_module``. Taken off on exit; what the
    patches did is undone by the ``undo`` callables they return."""

    def __init__(self, patches: dict[str, Any]):
        self._patches = patches
        self._undo: list[Any] = []
        self._finder: Any = None

    def _apply(self, name: str, module: Any) -> None:
        try:
            undo = self._patches[name](module)
        except Exception as e:  # a monitor must never stop the script it watches
            print(f"gradwatch: could not hook into {name} ({type(e).__name__}: {e}); it is not recorded.",
                  file=sys.stderr)
            return
        if undo is not None:
            self._undo.append(undo)

    def __enter__(self) -> "AfterImport":
        waiting = set()
        for name in self._patches:
            if name in sys.modules:
                self._apply(name, sys.modules[name])
            else:
                waiting.add(name)
        if not waiting:
            return self
        hooks = self

        class Finder:
            def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
                if name not in waiting:
                    return None
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                    return None
                exec_module = spec.loader.exec_module

                def exec_and_patch(module: Any) -> None:
                    exec_module(module)
                    waiting.discard(name)
                    hooks._apply(name, module)

                spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
                return spec

        self._finder = Finder()
        sys.meta_path.insert(0, self._finder)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._finder is not None and self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        while self._undo:
            self._undo.pop()()


class KerasHooks:
    """``gradwatch run`` for Keras 3 scripts, as soon as the script imports Keras.

    * torch backend: Keras optimizers are not torch ones, so their ``apply`` is wrapped on the base
      class, and each optimizer's first apply starts a stream for the Keras model that owns its
      variables;
    * tensorflow and jax backends: ``apply`` runs traced, so each ``fit`` gets a callback and a
      TensorFlow custom loop's optimizer is recorded from its first ``apply`` on
      (:class:`gradwatch.keras_sessions.RunnerHooks`, into a run of their own in the same directory).

    An optimizer that a ``gradwatch.keras.GradWatch`` callback of the script's own records is left to it."""

    def __init__(self, watch: Watch, others: dict[int, Any] | None = None, max_steps: int | None = None,
                 stop: Any = None):
        self._watch = watch
        self._attachments: dict[int, Any] = {}
        self._refused: set[int] = set()
        self._others = others if others is not None else {}
        self._max_steps = max_steps
        self._stop = stop
        #: The run of a TensorFlow or JAX Keras script (None until one records).
        self.compiled: Any = None
        self._imports = AfterImport({"keras.src.optimizers.base_optimizer": self._patch,
                                     "keras.src.models.model": self._patch_fit})

    def __enter__(self) -> "KerasHooks":
        self._imports.__enter__()
        return self

    @staticmethod
    def _backend(module: Any) -> str:
        from keras.src.backend import backend

        return backend()

    def _compiled_hooks(self) -> Any:
        if self.compiled is None:
            from .keras_sessions import RunnerHooks

            self.compiled = RunnerHooks(self._watch, self._max_steps, self._others, self._stop)
        return self.compiled

    def _patch_fit(self, module: Any) -> Any:
        if self._backend(module) == "torch":
            return None  # the torch backend is recorded at apply
        model_cls = module.Model
        had = "fit" in model_cls.__dict__
        original = model_cls.fit
        hooks = self

        def fit(model: Any, *args: Any, **kwargs: Any) -> Any:
            from .keras import GradWatch

            given = kwargs.get("callbacks")
            callbacks = [] if given is None else list(given) if isinstance(given, (list, tuple)) else None
            if callbacks is not None and not any(isinstance(c, GradWatch) for c in callbacks) and len(args) < 6:
                try:
                    kwargs["callbacks"] = [*callbacks, hooks._compiled_hooks().callback()]
                except Exception as e:  # a monitor must never stop the script it watches
                    print(f"gradwatch: could not add the Keras callback ({type(e).__name__}: {e}); this fit() is not "
                          "recorded.", file=sys.stderr)
            return original(model, *args, **kwargs)

        model_cls.fit = fit

        def undo() -> None:
            if had:
                model_cls.fit = original
            else:
                del model_cls.fit

        return undo

    def _patch(self, module: Any) -> Any:
        base = module.BaseOptimizer
        original = base.apply
        hooks = self
        compiled = self._backend(module) != "torch"

        def apply(opt: Any, grads: Any, trainable_variables: Any = None) -> Any:
            if compiled:
                try:
                    hooks._compiled_hooks().on_apply(opt, trainable_variables)
                except Exception as e:  # a monitor must never stop the script it watches
                    print(f"gradwatch: not recording {type(opt).__name__} after an internal error "
                          f"({type(e).__name__}: {e}); training continues.", file=sys.stderr)
                return original(opt, grads, trainable_variables)
            att = hooks._attachment(opt, trainable_variables)
            if att is None:
                return original(opt, grads, trainable_variables)
            grads = list(grads)
            att.before(grads, trainable_variables)
            try:
                return original(opt, grads, trainable_variables)
            finally:
                att.after()

        base.apply = apply
        return lambda: setattr(base, "apply", original)

    def _attachment(self, opt: Any, variables: Any) -> Any:
        key = id(opt)
        owner = claimed_by(getattr(opt, "inner_optimizer", None) or opt)
        if owner is not None:  # the script's own callback records it
            self._others[id(owner)] = owner
            return None
        if key in self._attachments or key in self._refused:
            return self._attachments.get(key)
        try:
            from .keras import find_keras_model
            from .keras_torch import KerasAttachment

            variables = list(variables if variables is not None else opt._trainable_variables)
            model = find_keras_model(variables, opt)
            self._attachments[key] = KerasAttachment(self._watch, model, opt, variables, wrap=False)
            self._attachments[key].capture_loss(model)  # the unscaled loss, also under a LossScaleOptimizer
        except GradwatchError as e:
            self._refused.add(key)
            print(f"gradwatch: not recording {type(opt).__name__}: {e}", file=sys.stderr)
        except Exception as e:  # a monitor must never stop the script it watches
            self._refused.add(key)
            print(f"gradwatch: not recording {type(opt).__name__} after an internal error "
                  f"({type(e).__name__}: {e}); training continues. Please report this.", file=sys.stderr)
        return self._attachments.get(key)

    def __exit__(self, *exc: Any) -> None:
        self._imports.__exit__(*exc)


class TrainerHooks:
    """Trainers that run the step themselves get gradwatch's callback for them, into this run.

    A Lightning ``Trainer`` runs the whole step inside ``optimizer.step(closure)`` and calls
    ``on_before_optimizer_step`` (before its own clipping) from inside that closure; a Hugging Face
    ``Trainer`` clips before ``optimizer.step()``. The callbacks read the gradients at those points.
    So the Trainer's ``__init__`` is wrapped, as soon as the script imports the Trainer's module, to
    add :class:`gradwatch.lightning.GradWatch` (to the ``callbacks`` argument, in a new list) or
    :class:`gradwatch.transformers.GradWatchCallback` (with ``add_callback`` after ``__init__``) —
    unless the script already gave one — recording into the runner's watch. The callback claims
    its optimizers, so the global hooks leave them alone.
    """

    LIGHTNING = ("lightning.pytorch.trainer.trainer", "pytorch_lightning.trainer.trainer")
    TRANSFORMERS = "transformers.trainer"

    def __init__(self, watch: Watch):
        self._watch = watch
        patches: dict[str, Any] = {name: self._patch_lightning for name in self.LIGHTNING}
        patches[self.TRANSFORMERS] = self._patch_transformers
        self._imports = AfterImport(patches)

    def __enter__(self) -> "TrainerHooks":
        self._imports.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._imports.__exit__(*exc)

    @staticmethod
    def _wrap_init(cls: type, wrapper: Any) -> Any:
        original = cls.__dict__["__init__"]
        patched = functools.wraps(original)(lambda self, *a, **k: wrapper(original, self, *a, **k))
        cls.__init__ = patched  # type: ignore[misc]
        return lambda: setattr(cls, "__init__", original) if cls.__dict__.get("__init__") is patched else None

    def _patch_lightning(self, module: Any) -> Any:
        def init(original: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["callbacks"] = self._lightning_callbacks(kwargs.get("callbacks"))
            return original(trainer, *args, **kwargs)

        return self._wrap_init(module.Trainer, init)

    def _lightning_callbacks(self, given: Any) -> Any:
        callbacks = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
        mine = sys.modules.get("gradwatch.lightning")
        if mine is not None and any(isinstance(c, mine.GradWatch) for c in callbacks):
            return given  # the script added gradwatch's callback itself: it records, once
        try:
            from .lightning import GradWatch
        except Exception as e:  # e.g. a pytorch_lightning without the lightning package
            print(f"gradwatch: could not add the Lightning callback ({type(e).__name__}: {e}); the global "
                  "optimizer hooks record instead, after Lightning's closure (clipped gradients, if it clips).",
                  file=sys.stderr)
            return given
        return [*callbacks, GradWatch(watch=self._watch)]

    def _patch_transformers(self, module: Any) -> Any:
        def init(original: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(trainer, *args, **kwargs)
            try:
                from .transformers import GradWatchCallback

                handler = getattr(trainer, "callback_handler", None)
                if not any(isinstance(c, GradWatchCallback) for c in getattr(handler, "callbacks", ())):
                    trainer.add_callback(GradWatchCallback(watch=self._watch))
            except Exception as e:  # a monitor must never stop the script it watches
                print(f"gradwatch: could not add the Trainer callback ({type(e).__name__}: {e}); the global "
                      "optimizer hooks record instead, after the Trainer's gradient clipping.", file=sys.stderr)
            return result

        return self._wrap_init(module.Trainer, init)
