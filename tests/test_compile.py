"""gradwatch under ``torch.compile`` (CPU).

What a user of ``torch.compile`` needs from a monitor:

* it does not change training: the final weights are bit-identical to the same compiled training
  without gradwatch (same seed, same data, a fresh compile);
* it does not change what gets compiled: no graph breaks, and no more graphs (recompiles) than
  without it — the activation tap, which puts forward hooks on and takes them off around sampled
  steps, is what is most likely to cost recompiles, so ``sample_every=2`` makes it toggle often;
* its statistics are right: the per-layer gradient norms equal those of the compiled model's own
  gradients, under the original module paths (not ``_orig_mod.``-prefixed ones);
* ``gradwatch run`` records a script that compiles its model, without extra compiles either.

Backend: the default, inductor (gcc builds its C++ kernels): the whole file took ~42 s with a cold
inductor cache and ~17 s warm on the 2-core development CPU, so aot_eager is not needed.
GRADWATCH_TEST_COMPILE_BACKEND=aot_eager switches every test to it (the same dynamo capture, hence
the same guards, recompiles and graph breaks, without the C++ build).

Activation statistics are also checked: their forward hooks run inside the compiled graph, and
torch.compile neither guards on hooks that were absent when it compiled
(``torch._dynamo.config.skip_nnmodule_hook_guards``) nor keeps them when a later entry was compiled
without them — so hooks that come and go can silently stop running. gradwatch keeps hooks that
were traced into a graph (a sticky tap) and turns the tap off, with a note, when the model was
compiled before the hooks went on.

Each model's pair of training runs (with and without gradwatch) is done once per module and shared
by the tests that look at it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import gradwatch

BACKEND = os.environ.get("GRADWATCH_TEST_COMPILE_BACKEND", "inductor")
STEPS = 12
SAMPLE_EVERY = 2  # sampled steps 0, 1, 2, 3, 4, 6, 8, 10: the tap attaches and detaches during the run
FLUSH_EVERY = 5  # several windows in 12 steps
TIMEOUT = 300  # bound on a hung `gradwatch run` child; a passing one takes well under a minute

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------------------------ models


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(),
        nn.Linear(32, 32), nn.Tanh(),
        nn.Linear(32, 32), nn.Tanh(),
        nn.Linear(32, 1),
    )


class TinyTransformer(nn.Module):
    """Two encoder layers (d_model 32, 4 heads, no dropout) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    # name: (factory, input shape per step, target shape per step)
    "mlp": (make_mlp, (16, 8), (16, 1)),
    "transformer": (TinyTransformer, (4, 8, 32), (4, 8, 1)),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]()


def data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, xs, ys = MODELS[name]
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, *xs, generator=g), torch.randn(STEPS, *ys, generator=g)


def fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()
    torch._dynamo.utils.guard_failures.clear()


@pytest.fixture(autouse=True)
def _isolated_dynamo():
    fresh_dynamo()
    yield
    fresh_dynamo()


# ------------------------------------------------------------------------------------ training


@dataclass
class Trained:
    state: dict[str, torch.Tensor]
    frame_count: int  # graphs handed to the backend (one per compiled frame, recompiles included)
    counters: dict[str, dict[str, int]]
    guard_failures: list[str]
    names: list[str]  # the model's own parameter names (no _orig_mod.)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[list[float]] = field(default_factory=list)  # per step, per parameter (model order)
    run: Any = None


def train(name: str, out: Path | None, compile: bool = True) -> Trained:
    """STEPS steps of Adam on the compiled model (or the eager one: ``compile=False``); under
    ``gradwatch.watch(compiled model, ...)`` when ``out`` is given."""
    fresh_dynamo()
    model = build(name)
    cnt = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(model, backend=cnt) if compile else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    X, Y = data(name)
    w = None
    if out is not None:
        w = gradwatch.watch(compiled, opt, out=out, quiet=True, report=False,
                            sample_every=SAMPLE_EVERY, flush_every=FLUSH_EVERY)
    losses, norms = [], []
    try:
        for i in range(STEPS):
            loss = nn.functional.mse_loss(compiled(X[i]), Y[i])
            opt.zero_grad()
            loss.backward()
            norms.append([torch.linalg.vector_norm(p.grad.double()).item() for p in model.parameters()])
            losses.append(loss.item())
            opt.step()
            if w is not None:
                w.log(loss=loss)
    finally:
        if w is not None:
            w.close()
    failures = [str(r) for reasons in torch._dynamo.utils.guard_failures.values() for r in reasons]
    return Trained(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        frame_count=int(cnt.frame_count),
        counters={k: dict(v) for k, v in counters.items()},
        guard_failures=failures,
        names=[n for n, _ in model.named_parameters()],
        losses=losses,
        grad_norms=norms,
        run=gradwatch.load_run(out) if out is not None else None,
    )


_cache: dict[str, tuple[Trained, Trained]] = {}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Trained, Trained]:
    """(model name, compiled run without gradwatch, the same under gradwatch.watch(compiled, ...))."""
    name = request.param
    if name not in _cache:
        plain = train(name, None)
        watched = train(name, tmp_path_factory.mktemp(f"compiled-{name}") / "run")
        _cache[name] = (plain, watched)
    return (name, *_cache[name])


@pytest.fixture(scope="module")
def eager_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """The same training under gradwatch, not compiled (the reference for activation statistics)."""
    return {name: train(name, tmp_path_factory.mktemp(f"eager-{name}") / "run", compile=False) for name in MODELS}


def _describe(t: Trained) -> str:
    return (f"frames compiled={t.frame_count}, graph_break={t.counters.get('graph_break', {})}, "
            f"stats={t.counters.get('stats', {})}, frames={t.counters.get('frames', {})}, "
            f"guard failures={t.guard_failures}")


# ------------------------------------------------------------------------------------ 1. bit-identical


def test_compiled_training_is_bit_identical(pair: tuple[str, Trained, Trained]) -> None:
    name, plain, watched = pair
    assert plain.state.keys() == watched.state.keys()
    differ = [k for k in plain.state if not torch.equal(plain.state[k], watched.state[k])]
    assert not differ, f"{name}: final weights differ with gradwatch: {differ}"
    assert plain.losses == watched.losses


# ------------------------------------------------------------------------------------ 2. no graph breaks, no recompiles


def test_no_graph_breaks(pair: tuple[str, Trained, Trained]) -> None:
    name, plain, watched = pair
    assert not plain.counters.get("graph_break"), f"{name} breaks by itself: {_describe(plain)}"
    assert watched.counters.get("graph_break", {}) == plain.counters.get("graph_break", {}), (
        f"{name}: gradwatch causes graph breaks.\nwithout: {_describe(plain)}\nwith:    {_describe(watched)}"
    )


def test_no_extra_compiles(pair: tuple[str, Trained, Trained]) -> None:
    """As many graphs compiled (and dynamo frames) with gradwatch as without: no recompiles."""
    name, plain, watched = pair
    assert plain.frame_count == 1, f"{name} without gradwatch: {_describe(plain)}"
    got = (watched.frame_count, watched.counters.get("stats", {}).get("unique_graphs"),
           watched.counters.get("frames", {}).get("total"), watched.guard_failures)
    want = (plain.frame_count, plain.counters.get("stats", {}).get("unique_graphs"),
            plain.counters.get("frames", {}).get("total"), plain.guard_failures)
    assert got == want, (
        f"{name}: gradwatch makes dynamo recompile.\nwithout: {_describe(plain)}\nwith:    {_describe(watched)}"
    )


def _explain(name: str, model: nn.Module) -> Any:
    x = data(name)[0][0]
    fresh_dynamo()
    return torch._dynamo.explain(model)(x)


@pytest.mark.parametrize("name", list(MODELS))
def test_explain_no_graph_break_with_tap_attached(name: str, tmp_path: Path) -> None:
    """One graph, no break, for the forward of a sampled step (the activation hooks are on)."""
    model = build(name)
    compiled = torch.compile(model, backend=BACKEND)
    before = _explain(name, model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradwatch.watch(compiled, opt, out=tmp_path / "run", quiet=True, report=False,
                         sample_every=SAMPLE_EVERY) as w:
        assert w.stream(opt).probe.activation_tap_attached  # step 0 is sampled: hooks on now
        during = _explain(name, model)
    for label, e in (("without gradwatch", before), ("with the tap attached", during)):
        assert e.graph_break_count == 0 and e.graph_count == 1, (
            f"{name} {label}: {e.graph_count} graphs, breaks: {[str(b.reason) for b in e.break_reasons]}"
        )


# ------------------------------------------------------------------------------------ 3. statistics and names


def test_grad_norms_match_compiled_grads(pair: tuple[str, Trained, Trained]) -> None:
    """Every step's recorded per-layer grad_norm equals the norm of the compiled model's gradient.

    Layers are matched by position (gradwatch orders them as model.parameters()), so that a naming
    problem does not hide here; names are test_layer_names_*'s business.
    """
    _, _, watched = pair
    run = watched.run
    assert list(run.steps) == list(range(STEPS))
    got = run.layer_series("grad_norm")
    assert got.shape == (STEPS, len(watched.names))
    np.testing.assert_allclose(got, np.array(watched.grad_norms), rtol=1e-5, atol=0)
    np.testing.assert_allclose(run.step_series("loss"), watched.losses, rtol=1e-6)
    np.testing.assert_allclose(run.step_series("grad_norm"),
                               np.linalg.norm(np.array(watched.grad_norms), axis=1), rtol=1e-5)


def _sampled_steps() -> list[int]:
    from gradwatch.probe.torch import ProbeConfig

    config = ProbeConfig(flush_every=FLUSH_EVERY, sample_every=SAMPLE_EVERY)
    return [s for s in range(STEPS) if config.is_sampled(s)]


def test_activation_stats_match_eager(pair: tuple[str, Trained, Trained], eager_runs: dict[str, Trained]) -> None:
    """The forward hooks run inside the compiled graph: at every sampled step the dead and
    saturated fractions are recorded, and equal those of the same training in eager mode."""
    name, _, watched = pair
    eager = eager_runs[name]
    sampled = _sampled_steps()
    for metric in ("act_dead_frac", "act_sat_frac"):
        want = eager.run.layer_series(metric)[sampled]
        got = watched.run.layer_series(metric)[sampled]
        hooked = np.isfinite(want).all(axis=0)  # act_sat_frac: only layers followed by a saturating activation
        assert hooked.any() or metric == "act_sat_frac", f"{name}: eager run recorded no {metric}"
        np.testing.assert_array_equal(got[:, hooked], want[:, hooked], err_msg=f"{name} {metric}")


def test_activation_stats_when_compiled_before_watch(tmp_path: Path) -> None:
    """A compiled model that already ran a forward before gradwatch attached (a warm-up or a
    validation pass; `gradwatch run` always attaches that late): its graph has no activation hooks
    and dynamo would not see them added, so gradwatch turns the tap off, says why, and forces no
    recompile (torch._dynamo.reset() would recompile every compiled function of the process)."""
    model = build("mlp")
    cnt = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(model, backend=cnt)
    X, Y = data("mlp")
    compiled(X[0])  # compiles the (training) forward with no hooks on the model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradwatch.watch(compiled, opt, out=tmp_path / "run", quiet=True, report=False,
                         sample_every=SAMPLE_EVERY) as w:
        for i in range(4):
            loss = nn.functional.mse_loss(compiled(X[i]), Y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        probe = w.stream(opt).probe
        assert not probe.activation_tap_attached and probe.activation_note  # turned off: no hooks left behind
    run = gradwatch.load_run(tmp_path / "run")
    assert np.isnan(run.layer_series("act_dead_frac")).all()  # absent, not made up
    assert np.isfinite(run.layer_series("grad_norm")).all()
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["streams"][0]["activation_stats"].startswith("off: ")
    assert "torch.compile" in meta["streams"][0]["activation_stats"]
    assert cnt.frame_count == 1


def test_sticky_tap_keeps_hooks_in_the_compiled_graph(pair: tuple[str, Trained, Trained]) -> None:
    """Compiled after the hooks went on: the hooks stay (sticky) and every sampled step has values."""
    _, _, watched = pair
    dead = watched.run.layer_series("act_dead_frac")
    sampled = _sampled_steps()
    assert np.isfinite(dead[sampled]).any(axis=1).all()
    unsampled = [s for s in range(STEPS) if s not in sampled]
    assert np.isnan(dead[unsampled]).all()  # collected at every step, kept only on sampled ones


def test_layer_names_with_compiled_module(pair: tuple[str, Trained, Trained]) -> None:
    """Given the torch.compile wrapper (OptimizedModule), layers keep the model's own paths."""
    name, _, watched = pair
    recorded = [layer.name for layer in watched.run.layers]
    assert recorded == watched.names, f"{name}: recorded {recorded[:3]}..., model has {watched.names[:3]}..."


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()", "original model"])
def test_layer_names_and_activations(how: str, tmp_path: Path) -> None:
    """The layer table (names, module types, following activation) does not depend on how the
    model was compiled, nor on whether gradwatch was given the wrapper or the model."""
    model = build("mlp")
    expected = [n for n, _ in model.named_parameters()]
    if how == "torch.compile(model)":
        target = torch.compile(model, backend=BACKEND)
    elif how == "model.compile()":
        model.compile(backend=BACKEND)  # in place: the module itself compiles its __call__
        target = model
    else:
        torch.compile(model, backend=BACKEND)
        target = model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradwatch.watch(target, opt, out=tmp_path / "run", quiet=True, report=False) as w:
        layers = w.layers
    assert [layer.name for layer in layers] == expected
    assert [layer.module_type for layer in layers] == ["Linear"] * 8
    assert [layer.activation for layer in layers] == ["Tanh"] * 6 + [None] * 2
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["streams"][0]["model"] == "Sequential", meta["streams"][0]


# ------------------------------------------------------------------------------------ 4. gradwatch run


COMPILED_SCRIPT = """\
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
cnt = CompileCounterWithBackend({backend!r})
compiled = torch.compile(model, backend=cnt)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
g = torch.Generator().manual_seed(1)
X, Y = torch.randn({steps}, 16, 8, generator=g), torch.randn({steps}, 16, 1, generator=g)
for i in range({steps}):
    loss = nn.functional.mse_loss(compiled(X[i]), Y[i])
    opt.zero_grad()
    loss.backward()
    opt.step()
    print("loss", repr(loss.item()))
print("compiled_frames", cnt.frame_count)
print("graph_breaks", sum(counters["graph_break"].values()))
print("final", repr(sum(p.double().sum().item() for p in model.parameters())))
"""


def _run_child(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False,
                          env={**os.environ, "GRADWATCH_REPORT": "0"})


def _value(stdout: str, key: str) -> str:
    return [line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith(key + " ")][-1]


def test_gradwatch_run_compiled_script(tmp_path: Path) -> None:
    script = tmp_path / "train_compiled.py"
    script.write_text(COMPILED_SCRIPT.format(backend=BACKEND, steps=STEPS))
    plain = _run_child([sys.executable, str(script)], tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    out = tmp_path / "run"
    watched = _run_child([sys.executable, "-m", "gradwatch", "run", "--out", str(out),
                          "--sample-every", str(SAMPLE_EVERY), str(script)], tmp_path)
    assert watched.returncode == 0, watched.stderr[-3000:]
    assert "Traceback" not in watched.stderr and "internal error" not in watched.stderr, watched.stderr[-3000:]

    run = gradwatch.load_run(out)
    assert run.status == "finished"
    assert list(run.steps) == list(range(STEPS))
    assert [layer.name for layer in run.layers] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert np.isfinite(run.layer_series("grad_norm")).all()
    # `gradwatch run` starts the stream at the first optimizer step, after the first forward was
    # compiled without activation hooks (and dynamo would not notice them added): the tap turns
    # itself off and says so, rather than force a recompile.
    assert np.isnan(run.layer_series("act_dead_frac")).all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["streams"][0]["activation_stats"].startswith("off: ")
    losses = [float(line.split()[1]) for line in watched.stdout.splitlines() if line.startswith("loss ")]
    np.testing.assert_allclose(run.step_series("loss"), losses, rtol=1e-6)

    # Same training, same compiles as under plain python.
    assert _value(watched.stdout, "final") == _value(plain.stdout, "final")
    assert _value(plain.stdout, "graph_breaks") == "0"
    assert _value(watched.stdout, "graph_breaks") == "0"
    # No recompile: the forward is compiled once, as under plain python.
    assert _value(plain.stdout, "compiled_frames") == "1"
    assert _value(watched.stdout, "compiled_frames") == "1"


def test_gradient_accumulation_under_compile_compiles_once(tmp_path: Path) -> None:
    """Two forwards per optimizer step: the tap's accumulators are preallocated tensors updated in
    place, so the second micro-batch reuses the graph (a growing dict would be guarded on)."""
    frames, states = [], []
    for watched in (False, True):
        fresh_dynamo()
        model = build("mlp")
        cnt = CompileCounterWithBackend(BACKEND)
        compiled = torch.compile(model, backend=cnt)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        X, Y = data("mlp")
        w = gradwatch.watch(compiled, opt, out=tmp_path / "acc", quiet=True, report=False,
                            sample_every=SAMPLE_EVERY) if watched else None
        for i in range(0, STEPS, 2):
            opt.zero_grad()
            for j in (i, i + 1):
                (nn.functional.mse_loss(compiled(X[j]), Y[j]) / 2).backward()
            opt.step()
        if w is not None:
            w.close()
        frames.append(cnt.frame_count)
        states.append([p.detach().clone() for p in model.parameters()])
    assert frames[1] == frames[0] == 1
    assert all(torch.equal(a, b) for a, b in zip(*states))
    dead = gradwatch.load_run(tmp_path / "acc").layer_series("act_dead_frac")
    assert np.isfinite(dead[0, [0, 2, 4, 6]]).all()
