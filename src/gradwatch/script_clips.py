"""The script's own gradient clipping, as ``gradwatch run`` sees it: a script that calls
``clip_grad_norm_`` / ``clip_grad_value_`` before ``optimizer.step()`` hands the global hooks
gradients that are already clipped, so the stream is told so (on stderr and in ``meta.json``)."""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch

from .watch import Watch


class ScriptClips:
    """Notes the script's own ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` calls (which
    parameters, which limit), so that :meth:`say` can tell that a stream's gradients were clipped
    before ``optimizer.step()`` saw them. The call itself is unchanged (a generator of parameters is
    read into a list first, which the function does as well)."""

    NAMES = {"clip_grad_norm_": "max_norm", "clip_grad_value_": "clip_value"}

    def __init__(self, watch: Watch):
        self._watch = watch
        self._undo: list[Any] = []
        #: The script's latest clip_grad_norm_/clip_grad_value_ call: (ids of its parameters, its settings).
        self.latest: tuple[set[int], dict[str, Any]] | None = None
        self._said: set[int] = set()

    def __enter__(self) -> "ScriptClips":
        from torch.nn.utils import clip_grad

        for name, limit in self.NAMES.items():
            original = getattr(clip_grad, name, None)
            if original is None:
                continue
            wrapper = self._wrap(original, name, limit)
            for module in (clip_grad, torch.nn.utils):
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapper)
                    self._undo.append(functools.partial(setattr, module, name, original))
        return self

    def _wrap(self, original: Any, name: str, limit_name: str) -> Any:
        clips = self

        @functools.wraps(original)
        def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            limit = args[0] if args else kwargs.get(limit_name)
            if isinstance(limit, (int, float)):
                clips.latest = ({id(p) for p in params}, {"function": name, limit_name: float(limit)})
            return original(params, *args, **kwargs)

        return clip

    def __exit__(self, *exc: Any) -> None:
        while self._undo:
            self._undo.pop()()

    def say(self, optimizer: torch.optim.Optimizer) -> None:
        """If the script clipped this optimizer's gradients itself before stepping, what reaches step()
        is clipped: said once per optimizer, on stderr and in the stream's meta.json entry."""
        if self.latest is None or id(optimizer) in self._said:
            return
        ids, clip = self.latest
        if not any(id(p) in ids for g in optimizer.param_groups for p in g["params"]):
            return
        self._said.add(id(optimizer))
        w = self._watch
        if not w.watches(optimizer):
            return
        w.describe_stream(optimizer, script_clipping=clip)
        if w.quiet:
            return
        limit = clip.get("max_norm", clip.get("clip_value"))
        option = "--clip-norm" if "max_norm" in clip else "--clip-value"
        print(f"gradwatch: the script clips {type(optimizer).__name__}'s gradients itself ({clip['function']}, "
              f"{'max_norm' if 'max_norm' in clip else 'clip_value'}={limit:g}) before optimizer.step(), so gradwatch "
              f"records them after that clip and they look no larger than {limit:g}. To see them before it, let "
              f"gradwatch clip instead: remove that call and run with `{option} {limit:g}`.", file=sys.stderr)
