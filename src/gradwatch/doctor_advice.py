"""Where in the user's script a code-change remedy (``treatment.NEEDS_CODE``) applies: the line to change.

:func:`locate` reads the script with :mod:`ast` (it never runs it) and matches what the stored run
knows (the output layer's type, units, activation and name; the recorded loss) against the calls
that build the model, the loss and the training data:

* ``change_output``: the constructor of the output layer (``Dense(1, activation="softmax")``,
  ``nn.Linear(16, 1)``), and the activation layer after it where the activation comes from there
  (``Dense(1)`` then ``Activation("softmax")``; ``nn.Sigmoid()`` after the ``nn.Linear`` in a list);
* ``change_loss``: the ``loss=`` of ``model.compile(...)``, or the loss's constructor or call
  (``keras.losses.BinaryCrossentropy()``, ``nn.BCELoss()``, ``F.mse_loss(...)``);
* ``scale_inputs`` / ``scale_targets``: Keras: ``x`` / ``y`` of the compiled model's ``fit(...)``;
  torch: the first / second tensor of ``TensorDataset(...)``, else the model's input / the target
  in the loss call; with the line that last assigned that variable.

A call is a candidate when nothing it states contradicts the run (a literal ``Dense(32)`` is not a
one-unit output, ``name="head"`` is not ``dense_2``, ``activation="relu"`` is not a softmax); among
the candidates, those that confirm the most facts win. Several winners: the first in the file, and
how many match ("1 of 2 matching calls; also train.py:40"). No candidate, any other action, a
script that cannot be read or parsed: None. It never raises, and imports no framework.
"""

from __future__ import annotations

import ast
import re
import tokenize
from pathlib import Path
from typing import Any, Callable

from .diagnose.facts import first_stream, last_part
from .findings import Finding
from .store import LayerInfo, Run

#: The actions :func:`locate` can place; any other gets None.
ACTIONS = ("change_output", "change_loss", "scale_inputs", "scale_targets")

_UNK: Any = object()  # an argument that is there but is not a literal (or cannot be told)
_QUOTE = 70  # longest quoted source, in characters

#: Activation names as written in scripts -> the layer table's names (gradwatch.keras's table).
_ACTIVATIONS = {"relu": "ReLU", "sigmoid": "Sigmoid", "tanh": "Tanh", "elu": "ELU", "selu": "SELU", "gelu": "GELU",
                "silu": "SiLU", "swish": "SiLU", "leaky_relu": "LeakyReLU", "softplus": "Softplus", "softsign": "Softsign",
                "hard_sigmoid": "Hardsigmoid", "mish": "Mish", "softmax": "Softmax", "relu6": "ReLU6",
                "hard_tanh": "Hardtanh", "log_softmax": "LogSoftmax", "linear": "linear"}
#: Layer classes that are an activation (Keras and torch.nn), named as the layer table names them.
_ACTIVATION_LAYERS = frozenset({
    "ReLU", "ReLU6", "LeakyReLU", "RReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh",
    "Hardtanh", "Hardsigmoid", "Hardswish", "Softplus", "Softsign", "LogSigmoid", "Tanhshrink", "Threshold",
    "Softmax", "LogSoftmax", "Softmin"})
#: Layers that may stand between a layer and its activation without changing which one it is.
_TRANSPARENT = re.compile(r"(\w*Dropout\w*|\w*Norm\w*|GaussianNoise|ActivityRegularization|Identity)$")
#: A torch loss, named by its autograd node -> the classes and functions that make it.
_NLL = ("CrossEntropyLoss", "cross_entropy", "NLLLoss", "nll_loss")
_TORCH_LOSSES = {
    "BinaryCrossEntropyBackward0": ("BCELoss", "binary_cross_entropy"), "NllLossBackward0": _NLL,
    "BinaryCrossEntropyWithLogitsBackward0": ("BCEWithLogitsLoss", "binary_cross_entropy_with_logits"),
    "MseLossBackward0": ("MSELoss", "mse_loss"), "NllLoss2DBackward0": _NLL, "L1LossBackward0": ("L1Loss", "l1_loss"),
    "SmoothL1LossBackward0": ("SmoothL1Loss", "smooth_l1_loss"), "HuberLossBackward0": ("HuberLoss", "huber_loss"),
    "KlDivBackward0": ("KLDivLoss", "kl_div")}
#: Keyword arguments only a Keras ``fit`` takes (not scikit-learn's): tells it apart without compile().
_KERAS_FIT_KW = frozenset({"epochs", "batch_size", "callbacks", "validation_data", "validation_split",
                           "steps_per_epoch", "verbose", "initial_epoch", "validation_steps"})

Scored = tuple[int, ast.AST, Any]  # (facts confirmed, the call, what else the message names)


def locate(script: str | Path, action: str, run: Run, finding: Finding | None = None) -> str | None:
    """Where in ``script`` (shown as given) to make the change ``action`` asks for, as a phrase for
    doctor's advice: ``the `Dense(1, activation='softmax')` output at train.py:23``; None where it
    cannot be told. Never raises. ``finding`` is accepted but not needed: the output layer is the
    run's (the last weight layer of the first optimizer, in execution order), as the diagnosis reads it.
    """
    if action not in ACTIONS:
        return None
    try:  # a script that is not there, not text or not Python (or a failure here) makes no advice
        with tokenize.open(Path(script)) as fh:  # honours a coding declaration
            src = _Source(str(script), fh.read())
        return _LOCATORS[action](src, run)
    except Exception:
        return None


class _Source:
    def __init__(self, label: str, text: str):
        self.label, self.text = label, text
        self.tree = ast.parse(text)
        self.parent: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
        calls = [n for n in ast.walk(self.tree) if isinstance(n, ast.Call)]
        self.calls: list[ast.Call] = sorted(calls, key=lambda n: (n.lineno, n.col_offset))

    def at(self, node: ast.AST) -> str:
        return f"{self.label}:{getattr(node, 'lineno', '?')}"

    def quote(self, node: ast.AST) -> str:
        seg = " ".join((ast.get_source_segment(self.text, node) or "").split())
        return seg if len(seg) <= _QUOTE else seg[: _QUOTE - 3] + "..."

    def assigned(self, name: str, use: ast.AST) -> ast.stmt | None:
        """The last assignment to ``name`` above ``use``, in its function (then in the module)."""
        home = self.parent.get(use)
        while home is not None and not isinstance(home, (ast.FunctionDef, ast.AsyncFunctionDef)):
            home = self.parent.get(home)
        for scope in dict.fromkeys([home or self.tree, self.tree]):
            found, todo = [], list(ast.iter_child_nodes(scope))
            while todo:
                n = todo.pop()
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                    continue  # another scope
                todo.extend(ast.iter_child_nodes(n))
                if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and n.lineno < use.lineno:
                    targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                    if any(isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store) and t.id == name
                           for g in targets for t in ast.walk(g)):
                        found.append(n)
            if found:
                return max(found, key=lambda n: n.lineno)
        return None

    def next_layers(self, call: ast.Call) -> list[ast.Call | None]:
        """The layers built after the one ``call`` builds: the next items of its list
        (``Sequential([...])``), else the first layer built by each following statement."""
        node: ast.AST = call
        up = self.parent.get(node)
        if isinstance(up, ast.Call) and up.func is node:  # the functional form: Dense(1)(x)
            node, up = up, self.parent.get(up)
        items = up.elts if isinstance(up, (ast.List, ast.Tuple)) else up.args if _callee(up) == "Sequential" else None
        if items is not None and any(e is node for e in items):  # [Dense(1), ...], nn.Sequential(nn.Linear(), ...)
            i = next(k for k, e in enumerate(items) if e is node)
            return [_first_layer(e) for e in items[i + 1:]]
        stmt = node
        while not isinstance(stmt, ast.stmt):
            stmt = self.parent[stmt]
        holder = self.parent.get(stmt)
        for field in ("body", "orelse", "finalbody"):
            body = getattr(holder, field, None)
            if isinstance(body, list) and any(s is stmt for s in body):
                i = next(k for k, s in enumerate(body) if s is stmt)
                return [_first_layer(s) for s in body[i + 1:]]
        return []


def _callee(call: ast.AST | None) -> str | None:
    if not isinstance(call, ast.Call):
        return None
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _first_layer(node: ast.AST) -> ast.Call | None:
    """The first class constructed in ``node`` (breadth first): ``Dense`` in ``model.add(Dense(1))``."""
    for n in ast.walk(node):
        name = _callee(n)
        if name and name[:1].isupper():
            return n
    return None


def _arg(call: ast.Call, pos: int | None, *names: str) -> Any:
    """The argument by keyword ``names`` or at ``pos``; None: not given; _UNK: maybe in ``*a``/``**kw``."""
    for kw in call.keywords:
        if kw.arg in names:
            return kw.value
    if pos is not None:
        if any(isinstance(a, ast.Starred) for a in call.args[: pos + 1]):
            return _UNK
        if pos < len(call.args):
            return call.args[pos]
    return _UNK if any(kw.arg is None for kw in call.keywords) else None


def _literal(node: Any) -> Any:
    if node is None or node is _UNK:
        return node
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _UNK


def _activation(node: Any) -> Any:
    """An activation argument as the layer table names it ("linear": none); _UNK: cannot be told."""
    if node is None:
        return "linear"
    if isinstance(node, ast.Constant):
        if node.value is None:
            return "linear"
        return _ACTIVATIONS.get(node.value.lower(), _UNK) if isinstance(node.value, str) else _UNK
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return _ACTIVATIONS.get(name.lower(), _UNK)  # keras.activations.softmax, or softmax imported from there


def _following_activation(src: _Source, call: ast.Call) -> tuple[Any, ast.Call | None]:
    """(name or _UNK, call) of the activation layer after ``call``'s, past dropout and normalisation."""
    for nxt in src.next_layers(call):
        name = _callee(nxt)
        if nxt is None or name is None:
            break
        if name == "Activation":
            return _activation(_arg(nxt, 0, "activation")), nxt
        if name in _ACTIVATION_LAYERS:
            return name, nxt
        if not _TRANSPARENT.match(name):
            break
    return None, None


def _pick(src: _Source, scored: list[Scored]) -> tuple[Scored, str] | None:
    """The candidate that confirms the most facts (the first of equals), and a note on the others."""
    if not scored:
        return None
    top = max(s[0] for s in scored)
    best = sorted((s for s in scored if s[0] == top), key=lambda s: (s[1].lineno, s[1].col_offset))
    if len(best) == 1:
        return best[0], ""
    also = ", ".join(src.at(s[1]) for s in best[1:4]) + (", ..." if len(best) > 4 else "")
    return best[0], f" (1 of {len(best)} matching calls; also {also})"


# ---------------------------------------------------------------------------------- change_output


def _is_keras(layer: LayerInfo) -> bool:
    return "kernel" in last_part(layer.name)  # Keras (and Flax) kernels; torch names weights


def _auto_named(name: str, cls: str) -> bool:
    """Whether ``name`` is one Keras gives a layer of class ``cls`` unasked (``dense``, ``dense_2``)."""
    snake = re.sub(r"([a-z])([A-Z])", r"\1_\2", re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", cls)).lower()
    return re.fullmatch(rf"{re.escape(snake)}(_\d+)?", name, re.IGNORECASE) is not None


def _output_candidate(src: _Source, call: ast.Call, layer: LayerInfo) -> Scored | None:
    keras = _is_keras(layer)
    score = 0
    if keras:
        parts = layer.name.split("/")
        own_name = parts[-2] if len(parts) >= 2 else None
        given = _literal(_arg(call, None, "name"))
        if given is None and own_name and not _auto_named(own_name, layer.module_type):
            return None  # the layer was named, this one was not
        if isinstance(given, str):
            if given != own_name:
                return None
            score += 10  # the name alone settles it
    units = layer.shape[-1] if keras else layer.shape[0]
    checks = [(_arg(call, 0, "units", "filters", "features") if keras else _arg(call, 1, "out_features", "out_channels"),
               units)]
    if not keras and len(layer.shape) >= 2:
        checks.append((_arg(call, 0, "in_features", "in_channels"), layer.shape[1]))
    for node, want in checks:
        value = _literal(node)
        if isinstance(value, int) and not isinstance(value, bool):
            if value != want:
                return None
            score += 1
    want_act = layer.activation or "linear"
    own = _activation(_arg(call, 1 if layer.module_type == "Dense" else None, "activation")) if keras else "linear"
    follow = None
    if own is not _UNK and own != "linear":
        if own != want_act:
            return None
        score += 1
    elif own == "linear":
        act, node = _following_activation(src, call)
        if act is not None and act is not _UNK:
            if act != want_act:
                return None
            score += 1
            follow = node
    return score, call, follow


def _output_layer(run: Run) -> LayerInfo | None:
    ids = first_stream(run)
    return run.layers[ids[-1]] if ids else None


def _locate_output(src: _Source, run: Run) -> str | None:
    layer = _output_layer(run)
    if layer is None:
        return None
    scored = [s for c in src.calls if _callee(c) == layer.module_type
              and (s := _output_candidate(src, c, layer)) is not None]
    picked = _pick(src, scored)
    if picked is None:
        return None
    (_, call, follow), note = picked
    text = f"the `{src.quote(call)}` output"
    if follow is not None and follow.lineno != call.lineno:
        text += f" at {src.at(call)} and its `{src.quote(follow)}`"
    elif follow is not None:
        text += f" and its `{src.quote(follow)}`"
    return f"{text} at {src.at(follow or call)}{note}"


# ---------------------------------------------------------------------------------- change_loss


def _recorded_loss(run: Run) -> str | None:
    loss = (run.streams or [{}])[0].get("loss")
    return str(loss) if loss else None


def _key(name: str) -> str:
    """``binary_crossentropy``, ``BinaryCrossentropy(from_logits=True)`` -> ``binarycrossentropy``."""
    return name.split("(")[0].lower().replace("_", "").replace(" ", "")


def _torch_names(loss: str | None) -> set[str]:
    if loss and loss in _TORCH_LOSSES:
        return set(_TORCH_LOSSES[loss])
    return {n for names in _TORCH_LOSSES.values() for n in names} if not loss or "Backward" in loss else set()


def _compile_loss_score(value: ast.AST, key: str | None) -> int | None:
    """Whether a ``compile(loss=...)`` value is the recorded loss: 1 yes, 0 cannot tell, None no."""
    if isinstance(value, ast.Name):  # a function, or a variable holding the loss
        return 1 if key and _key(value.id) == key else 0
    name = (value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else _callee(value)
            if isinstance(value, ast.Call) else value.attr if isinstance(value, ast.Attribute) else None)
    if name is None:
        return None  # one loss per output (a list or dict): not one output/loss pair
    return 0 if key is None else 1 if _key(name) == key else None


def _locate_loss(src: _Source, run: Run) -> str | None:
    loss = _recorded_loss(run)
    torch_names = _torch_names(loss)
    key = None if loss is None or "Backward" in loss else _key(loss)
    scored: list[Scored] = []
    inside: set[ast.AST] = set()
    layer = _output_layer(run)
    for c in src.calls:
        if layer is None or not _is_keras(layer) or _callee(c) != "compile" or not isinstance(c.func, ast.Attribute):
            continue  # model.compile(loss=...) is Keras' (torch.compile, re.compile are not)
        value = _arg(c, 1, "loss")
        if value is None or value is _UNK:
            continue
        inside |= set(ast.walk(value))
        score = _compile_loss_score(value, key)
        if score is not None:
            scored.append((score, c, next((k for k in c.keywords if k.arg == "loss"), value)))
    for c in src.calls:
        name = _callee(c)
        if c in inside or not name:
            continue
        if (key is not None and _key(name) == key) or name in torch_names:
            scored.append((1, c, None))
    picked = _pick(src, scored)
    if picked is None:
        return None
    (_, call, part), note = picked
    if part is None:
        return f"the loss `{src.quote(call)}` at {src.at(call)}{note}"
    return f"the `{src.quote(part)}` in `{src.quote(call.func)}(...)` at {src.at(part)}{note}"


# ---------------------------------------------------------------------------------- scale_inputs / scale_targets


def _base_name(node: ast.AST) -> str | None:
    """``y`` from ``y``, ``y[i:j]``, ``y.float()``, ``y.to(device)[idx]``."""
    while True:
        if isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (not node.args or node.func.attr == "to"):
            node = node.func.value
        else:
            return node.id if isinstance(node, ast.Name) else None


def _keras_fits(src: _Source) -> list[ast.Call]:
    """``fit`` calls on a model that is compiled in the script (else: that take Keras' arguments)."""
    fits = [c for c in src.calls if _callee(c) == "fit" and isinstance(c.func, ast.Attribute)]
    compiled = {src.quote(c.func.value) for c in src.calls
                if _callee(c) == "compile" and isinstance(c.func, ast.Attribute)}
    on_model = [c for c in fits if src.quote(c.func.value) in compiled]
    return on_model or [c for c in fits if any(kw.arg in _KERAS_FIT_KW for kw in c.keywords)]


def _torch_loss_calls(src: _Source, run: Run) -> list[ast.Call]:
    """Calls of a loss function (``F.mse_loss(out, y)``) or object (``criterion = nn.MSELoss()``)."""
    names = _torch_names(_recorded_loss(run))
    bound = set()
    for stmt in ast.walk(src.tree):
        if isinstance(stmt, ast.Assign) and _callee(stmt.value) in names and (_callee(stmt.value) or "")[:1].isupper():
            bound |= {src.quote(t) for t in stmt.targets}
    return [c for c in src.calls if src.quote(c.func) in bound
            or ((_callee(c) or "") in names and (_callee(c) or "")[:1].islower())]


def _model_input(src: _Source, pred: Any) -> ast.AST | None:
    """``x`` of ``loss(model(x), y)``, or of ``out = model(x)`` above ``loss(out, y)``."""
    if isinstance(pred, ast.Name):
        stmt = src.assigned(pred.id, pred)
        pred = stmt.value if isinstance(stmt, ast.Assign) else None
    if isinstance(pred, ast.Call) and pred.args and not isinstance(pred.args[0], ast.Starred):
        return pred.args[0]
    return None


def _locate_data(src: _Source, run: Run, targets: bool) -> str | None:
    layer = _output_layer(run) or (run.layers[0] if run.layers else None)
    scored: list[Scored] = []
    if layer is not None and _is_keras(layer):
        for c in _keras_fits(src):
            value = _arg(c, 1, "y") if targets else _arg(c, 0, "x")
            if value is not None and value is not _UNK:
                scored.append((0, c, value))
    else:
        datasets = [c for c in src.calls if _callee(c) == "TensorDataset"]
        for c in datasets:
            if len(c.args) == 2 and not c.keywords and not any(isinstance(a, ast.Starred) for a in c.args):
                scored.append((0, c, c.args[1 if targets else 0]))
        if not datasets:
            for c in _torch_loss_calls(src, run):
                value = _arg(c, 1, "target") if targets else _model_input(src, _arg(c, 0, "input"))
                if value is not None and value is not _UNK:
                    scored.append((0, c, value))
    picked = _pick(src, scored)
    if picked is None:
        return None
    (_, call, value), note = picked
    text = f"the {'targets' if targets else 'inputs'} `{src.quote(value)}` in `{src.quote(call.func)}(...)` at {src.at(value)}"
    name = _base_name(value)
    stmt = src.assigned(name, value) if name else None
    if stmt is not None:
        text += f" ({'' if isinstance(value, ast.Name) else f'`{name}` '}set at line {stmt.lineno})"
    return text + note


_LOCATORS: dict[str, Callable[[_Source, Run], str | None]] = {
    "change_output": _locate_output,
    "change_loss": _locate_loss,
    "scale_inputs": lambda src, run: _locate_data(src, run, targets=False),
    "scale_targets": lambda src, run: _locate_data(src, run, targets=True),
}
