"""JAX with optax (Flax NNX, Flax Linen, plain pytrees): gradwatch.optax.watch records inside the
jitted step and reads the device once per flush; its optax guards record what they did.

XLA compiles a jitted step as a whole, so the statistics' reads of the gradients can change how the
user's own ops are fused, and with them the last bits of the result (see gradwatch.optax's
docstring): the bit-identity check jits the gradients and the update apart."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import gradwatch as gw  # noqa: E402
import gradwatch.optax as gwx  # noqa: E402
from gradwatch.optax_guards import path_name  # noqa: E402


FLUSH = 20
STEPS = 60


def _data(n: int = 256, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    y = ((x[:, 0] + 0.5 * x[:, 1] - x[:, 2] * x[:, 3]) > 0).astype("float32")[:, None]
    return x, y


def _bce(logits: Any, y: Any) -> Any:
    return optax.sigmoid_binary_cross_entropy(logits, y).mean()


def _weight_layers(run: Any) -> list[str]:
    return [layer.name for layer in run.layers if layer.name.endswith("kernel")]


def _assert_vanishes_from_the_input(run: Any) -> None:
    found = [f for f in gw.diagnose(run) if f.kind == "vanishing_gradients"]
    assert found, gw.diagnose(run)
    weights = _weight_layers(run)
    starved = found[0].layers
    assert starved[0] == weights[0] and weights[-1] not in starved  # from the input side, not the output layer
    assert starved == [w for w in weights if w in starved]  # in depth order
    rms = np.nanmedian(run.layer_series("grad_rms")[:, [layer.name for layer in run.layers].index(weights[0])])
    out = np.nanmedian(run.layer_series("grad_rms")[:, [layer.name for layer in run.layers].index(weights[-1])])
    assert rms < 0.01 * out


def _serious(findings: list[Any]) -> list[str]:
    return [f"{f.kind} ({f.severity}): {f.summary}" for f in findings if f.severity in ("warning", "error")]


# ----------------------------------------------------------------------------- Flax Linen, functional


class LinenMLP(nn.Module):
    depth: int
    width: int
    act: str
    bias: bool = True

    @nn.compact
    def __call__(self, x: Any) -> Any:
        for _ in range(self.depth):
            x = getattr(nn, self.act)(nn.Dense(self.width, use_bias=self.bias)(x))
        return nn.Dense(1)(x)


def _linen_run(out: Path, depth: int, act: str, tx: Any, split_grads: bool = False, bias: bool = True) -> dict[str, Any]:
    """Train a Linen MLP with the issue's loop; note the fetch count after every step, under
    transfer_guard("disallow"), and (split_grads) keep each step's gradients."""
    x, y = _data()
    model = LinenMLP(depth=depth, width=16, act=act, bias=bias)
    params = model.init(jax.random.PRNGKey(0), x[:1])
    wtx = gwx.watch(tx, out=out, quiet=True, flush_every=FLUSH,
                    activations={f"Dense_{i}": act for i in range(depth)})
    state = wtx.init(params)

    def loss_fn(p: Any, xb: Any, yb: Any) -> Any:
        return _bce(model.apply(p, xb), yb)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    @jax.jit
    def train_step(p: Any, s: Any, xb: Any, yb: Any) -> Any:
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        u, s = wtx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    @jax.jit
    def apply_step(p: Any, s: Any, g: Any) -> Any:
        u, s = wtx.update(g, s, p)
        return optax.apply_updates(p, u), s

    xd, yd = jax.device_put(x), jax.device_put(y)
    fetches, grads = [], []
    with jax.transfer_guard("disallow"):
        for _ in range(STEPS):
            if split_grads:
                loss, g = grad_fn(params, xd, yd)
                grads.append(g)
                params, state = apply_step(params, state, g)
            else:
                params, state, loss = train_step(params, state, xd, yd)
            wtx.step(state, loss=loss)
            fetches.append(wtx.session.stream_for(id(wtx._recorder)).fetches)
    wtx.close()
    return {"run": gw.load_run(out), "fetches": fetches, "grads": grads, "tx": wtx}


@pytest.fixture(scope="module")
def linen_sigmoid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _linen_run(tmp_path_factory.mktemp("linen") / "sig", depth=8, act="sigmoid", tx=optax.sgd(0.1), bias=False)


@pytest.fixture(scope="module")
def linen_healthy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _linen_run(tmp_path_factory.mktemp("linen") / "ok", depth=3, act="tanh", tx=optax.adam(1e-2),
                      split_grads=True)


def test_linen_deep_sigmoid_mlp_vanishes_at_the_input_side(linen_sigmoid: dict[str, Any]) -> None:
    run = linen_sigmoid["run"]
    assert len(run.steps) == STEPS and list(run.steps) == list(range(STEPS))
    assert [layer.name for layer in run.layers[:2]] == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    assert run.layers[0].module_type == "Dense" and run.layers[0].activation == "Sigmoid"
    assert [layer.name for layer in run.layers[-2:]] == ["params/Dense_8/kernel", "params/Dense_8/bias"]
    assert run.layers[-1].activation is None  # the output layer
    assert np.isfinite(run.step_series("loss")).all() and run.step_series("loss_logged").all()
    _assert_vanishes_from_the_input(run)


def test_no_host_read_between_flushes(linen_sigmoid: dict[str, Any]) -> None:
    # transfer_guard checks nothing on CPU (jax-ml/jax#16602): the fetches counted are the proof.
    fetches = linen_sigmoid["fetches"]
    assert fetches == [(i + 1) // FLUSH for i in range(STEPS)]


def test_linen_healthy_mlp_has_no_warning(linen_healthy: dict[str, Any]) -> None:
    run = linen_healthy["run"]
    assert len(run.steps) == STEPS and not _serious(gw.diagnose(run)), _serious(gw.diagnose(run))
    loss = run.step_series("loss")
    assert loss[-1] < 0.8 * loss[0]


def test_per_layer_grad_norms_match_a_float64_recomputation(linen_healthy: dict[str, Any]) -> None:
    run, grads = linen_healthy["run"], linen_healthy["grads"]
    stored = run.layer_series("grad_norm")
    names = [layer.name for layer in run.layers]
    for step in (0, 1, 17, STEPS - 1):
        flat = jax.tree_util.tree_flatten_with_path(jax.device_get(grads[step]))[0]
        want = {path_name(p): np.linalg.norm(np.asarray(g, np.float64).ravel()) for p, g in flat}
        expect = np.array([want[n] for n in names])
        np.testing.assert_allclose(stored[step], expect, rtol=1e-5)
    global_norm = np.sqrt((stored ** 2).sum(axis=1))
    np.testing.assert_allclose(run.step_series("grad_norm"), global_norm, rtol=1e-5)


# ----------------------------------------------------------------------------- Flax NNX, nnx.Optimizer


class NNXMLP(nnx.Module):
    def __init__(self, depth: int, width: int, act: Any, rngs: nnx.Rngs, bias: bool = True):
        self.inp = nnx.Linear(8, width, use_bias=bias, rngs=rngs)
        self.hidden = nnx.List([nnx.Linear(width, width, use_bias=bias, rngs=rngs) for _ in range(depth - 1)])
        self.out = nnx.Linear(width, 1, rngs=rngs)
        self.act = act

    def __call__(self, x: Any) -> Any:
        x = self.act(self.inp(x))
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.out(x)


def _nnx_run(out: Path, depth: int, act: Any, tx: Any, bias: bool = True) -> Any:
    x, y = _data(seed=1)
    model = NNXMLP(depth, 16, act, nnx.Rngs(0), bias=bias)
    name = act.__name__
    wtx = gwx.watch(tx, out=out, quiet=True, flush_every=FLUSH, activations={"inp": name, "hidden": name})
    optimizer = nnx.Optimizer(model, wtx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model: Any, optimizer: Any, xb: Any, yb: Any) -> Any:
        loss, grads = nnx.value_and_grad(lambda m: _bce(m(xb), yb))(model)
        optimizer.update(model, grads)
        return loss

    xd, yd = jax.device_put(x), jax.device_put(y)
    for _ in range(STEPS):
        loss = train_step(model, optimizer, xd, yd)
        wtx.step(optimizer.opt_state, loss=loss)
    wtx.close()
    return gw.load_run(out)


def test_nnx_deep_sigmoid_mlp_vanishes_at_the_input_side(tmp_path: Path) -> None:
    run = _nnx_run(tmp_path / "sig", depth=8, act=jax.nn.sigmoid, tx=optax.sgd(0.1), bias=False)
    assert len(run.steps) == STEPS
    # Definition order (inp, hidden, out), not jax's sorted keys; names without NNX's trailing "value".
    assert [layer.name for layer in run.layers[:3]] == ["inp/kernel", "hidden/0/kernel", "hidden/1/kernel"]
    assert run.layers[0].module_type == "Linear" and run.layers[0].activation == "Sigmoid"
    assert [layer.name for layer in run.layers[-2:]] == ["out/kernel", "out/bias"] and run.layers[-1].activation is None
    _assert_vanishes_from_the_input(run)


def test_nnx_healthy_mlp_has_no_warning(tmp_path: Path) -> None:
    run = _nnx_run(tmp_path / "ok", depth=3, act=jax.nn.relu, tx=optax.adam(1e-2))
    assert [layer.name for layer in run.layers[:3]] == ["inp/kernel", "inp/bias", "hidden/0/kernel"]
    assert not _serious(gw.diagnose(run)), _serious(gw.diagnose(run))
    assert np.isfinite(run.layer_series("weight_norm")).any() and np.isfinite(run.layer_series("update_ratio")).any()


# ----------------------------------------------------------------------------- plain pytrees: guards


def _tiny() -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    params = {"l1": {"w": rng.normal(0, 0.5, (8, 16)), "b": np.zeros(16)},
              "l2": {"w": rng.normal(0, 0.5, (16, 1)), "b": np.zeros(1)}}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = rng.standard_normal((64, 8)).astype("float32")
    y = (x @ rng.standard_normal((8, 1))).astype("float32")
    return params, x, y


def _tiny_loss(p: Any, x: Any, y: Any) -> Any:
    h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    return jnp.mean((h @ p["l2"]["w"] + p["l2"]["b"] - y) ** 2)


_tiny_grad = jax.jit(jax.grad(_tiny_loss))


def _tiny_train(tx: Any, steps: int, scale_at: dict[int, float] | None = None, out: Path | None = None,
                keep: bool = False) -> tuple[Any, Any, list[Any]]:
    """Train the tiny pytree model; ``scale_at``: step -> factor the gradients are multiplied by."""
    params, x, y = _tiny()
    state = tx.init(params)

    @jax.jit
    def step(p: Any, s: Any, factor: Any) -> Any:
        loss, g = jax.value_and_grad(_tiny_loss)(p, x, y)
        g = jax.tree.map(lambda a: a * factor, g)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    history = []
    for i in range(steps):
        params, state, loss = step(params, state, jnp.float32((scale_at or {}).get(i, 1.0)))
        if keep:
            history.append(params)
        if isinstance(tx, gwx.Watched):
            tx.step(state, loss=loss)
    return params, state, history


def _adam_count(state: Any) -> int:
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    return int(adam[0].count)


def _same(a: Any, b: Any) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_zclip_bounds_a_spike_and_a_chained_skip_keeps_a_nan_step_out(tmp_path: Path) -> None:
    spike, nan_step = 20, 5
    tx = gwx.watch(optax.chain(gwx.zclip(warmup=10), gwx.skip_nonfinite(), optax.adam(1e-2)), out=tmp_path / "z",
                   quiet=True, flush_every=10)
    params, state, history = _tiny_train(tx, 30, {spike: 100.0, nan_step: math.nan}, keep=True)
    tx.close()
    run = gw.load_run(tmp_path / "z")
    raw, after = run.step_series("grad_norm"), run.step_series("grad_norm_clipped")
    coef, thr = run.step_series("clip_coef"), run.step_series("clip_threshold")
    # ZClip: the spike is stored as it came, and the norm the optimizer used is bounded.
    assert raw[spike] > 50 * raw[spike - 1]
    assert after[spike] <= thr[spike] and after[spike] < 0.1 * raw[spike]
    assert coef[spike] < 0.1 and math.isclose(coef[spike], after[spike] / raw[spike], rel_tol=1e-5)
    assert np.isnan(thr[:10]).all() and np.isfinite(thr[10:]).all()  # no threshold during the warm-up
    others = np.r_[10:spike, spike + 1:30]
    np.testing.assert_allclose(coef[others], 1.0, rtol=1e-6)
    np.testing.assert_allclose(after[:nan_step], raw[:nan_step], rtol=1e-6)
    # The chained skip: the NaN step is recorded as skipped and changed neither params nor Adam's state.
    assert list(np.flatnonzero(run.step_series("skipped"))) == [nan_step] and np.isnan(raw[nan_step])
    assert _same(history[nan_step - 1], history[nan_step]) and _adam_count(state) == 29
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))
    stream = run.streams[0]
    assert [g["name"] for g in stream["guards"]] == ["ZClip", "SkipNonFinite"] and stream["guards"][0]["warmup"] == 10
    assert stream["guard_summary"] == ["ZClip(alpha=0.97, z_thresh=2.5, warmup=10, eps=1e-06) acted on 1 of 20 steps",
                                       "SkipNonFinite skipped 1 step with non-finite gradients (at 5)"]
    kinds = {f.kind: f for f in gw.diagnose(run)}
    assert kinds["nonfinite"].severity == "warning" and "contained" in kinds["nonfinite"].summary


@pytest.mark.parametrize("form", ["holding", "apply_if_finite"])
def test_a_nan_step_is_skipped_recorded_and_leaves_params_and_state(form: str, tmp_path: Path) -> None:
    inner = optax.adam(1e-2)
    tx = gwx.skip_nonfinite(inner) if form == "holding" else optax.apply_if_finite(inner, 3)
    w = gwx.watch(tx, out=tmp_path / form, quiet=True, flush_every=5)
    params, state, history = _tiny_train(w, 12, {5: math.nan}, keep=True)
    w.close()
    run = gw.load_run(tmp_path / form)
    assert list(np.flatnonzero(run.step_series("skipped"))) == [5]
    assert not np.isfinite(run.step_series("grad_norm")[5])
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))
    assert _same(history[4], history[5]) and _adam_count(state) == 11
    stream = run.streams[0]
    assert stream["guards"][0]["name"] == "SkipNonFinite"
    assert "skipped 1 step with non-finite gradients (at 5)" in stream["guard_summary"][-1]
    nonfinite = [f for f in gw.diagnose(run) if f.kind == "nonfinite"]
    assert nonfinite and all(f.severity == "warning" and "contained" in f.summary for f in nonfinite)


def test_skip_nonfinite_stops_after_max_consecutive_skips(tmp_path: Path) -> None:
    params, _, _ = _tiny()
    tx = gwx.watch(optax.chain(gwx.skip_nonfinite(max_consecutive=3), optax.sgd(0.1)), out=tmp_path / "s",
                   quiet=True, flush_every=2)
    state = tx.init(params)
    nan = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), params)
    with pytest.raises(gwx.GuardStop, match="4 optimizer steps in a row had non-finite gradients \\(steps 0-3\\)"):
        for _ in range(10):
            _, state = tx.update(nan, state, params)  # outside jit: the watch jits it
            tx.step(state)
    tx.close(status="stopped")
    assert len(tx.run.steps) == 4 and tx.run.step_series("skipped").all()


def test_clip_by_global_norm_and_adaptive_grad_clip_are_optaxs_own_and_record() -> None:
    params, x, y = _tiny()
    g = jax.tree.map(lambda a: a * 50.0, _tiny_grad(params, x, y))
    pairs = [(gwx.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)),
             (gwx.adaptive_grad_clip(0.01), optax.adaptive_grad_clip(0.01))]

    @jax.jit
    def both(g: Any, p: Any) -> Any:
        return [(ours.update(g, ours.init(p), p), theirs.update(g, theirs.init(p), p)[0]) for ours, theirs in pairs]

    ((clipped, clip_state), want_clipped), ((agc_out, agc_state), want_agc) = both(g, params)
    for a, b in zip(jax.tree.leaves(want_clipped) + jax.tree.leaves(want_agc),
                    jax.tree.leaves(clipped) + jax.tree.leaves(agc_out)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    rec = clip_state.record
    assert math.isclose(float(rec.norm_after), 1.0, rel_tol=1e-6) and float(rec.threshold) == 1.0 and bool(rec.acted)
    assert bool(agc_state.record.acted) and float(agc_state.record.norm_after) < float(optax.tree.norm(g))


def test_zclip_autoclip_and_agc_match_the_torch_guards() -> None:
    torch = pytest.importorskip("torch")
    from gradwatch.guards import AGC, AutoClip, ZClip
    from gradwatch.guards.base import GuardSetup, GuardStep

    def torch_step(params: list[Any], grads: list[Any], guard: Any, layers: list[Any] | None = None) -> Any:
        if not hasattr(guard, "_ready"):
            guard.setup(GuardSetup(torch.optim.SGD(params, lr=0.1), None, layers or [], params, torch.device("cpu"),
                                   lambda line: None))
            guard._ready = True
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        step = GuardStep(0, list(range(len(grads))), params, grads, norms, torch.device("cpu"))
        guard.before_step(step)
        return step

    # ZClip and AutoClip on one norm sequence with a NaN and two spikes: the same norms after and thresholds.
    norms = list(np.abs(np.random.default_rng(0).normal(1, 0.2, 40)))
    norms[15], norms[25], norms[33] = math.nan, 30.0, 8.0
    p = torch.nn.Parameter(torch.zeros(3))
    for theirs, ours in ((ZClip(warmup=10), gwx.zclip(warmup=10)), (AutoClip(25), gwx.autoclip(25))):
        state, update = ours.init({"w": jnp.zeros(3)}), jax.jit(ours.update)
        for n in norms:
            step = torch_step([p], [torch.tensor([n, 0.0, 0.0])], theirs)
            _, state = update({"w": jnp.array([n, 0.0, 0.0], jnp.float32)}, state)
            want = [float(step.norm()), math.nan if step.threshold is None else float(step.threshold)]
            np.testing.assert_allclose([float(state.record.norm_after), float(state.record.threshold)], want, rtol=1e-5)
    # AGC: a unit is a row of torch's (out, in) weight, a column of JAX's (in, out) kernel; a bias element-wise.
    params, x, y = _tiny()
    g = jax.tree.map(lambda a: a * 30.0, _tiny_grad(params, x, y))
    agc = gwx.agc(0.01, exclude=["l2"])
    out, st = jax.jit(agc.update)(g, agc.init(params), params)
    w, b = (torch.nn.Parameter(torch.tensor(np.asarray(params["l1"][k]).T.copy())) for k in ("w", "b"))
    grads = [torch.tensor(np.asarray(g["l1"]["w"]).T.copy()), torch.tensor(np.asarray(g["l1"]["b"]))]
    from gradwatch.store import LayerInfo

    torch_step([w, b], grads, AGC(0.01, exclude=[]), [LayerInfo("l1.weight", (16, 8), 128, "Linear"),
                                                       LayerInfo("l1.bias", (16,), 16, "Linear")])
    np.testing.assert_allclose(out["l1"]["w"], grads[0].numpy().T, rtol=1e-5)
    np.testing.assert_allclose(out["l1"]["b"], grads[1].numpy(), rtol=1e-5)
    assert np.array_equal(out["l2"]["w"], g["l2"]["w"]) and bool(st.record.acted)  # l2 is excluded


def test_watching_changes_nothing_and_records_lr_and_loss(tmp_path: Path) -> None:
    # Gradients from one jitted function, the update in another (see the module's docstring).
    params, x, y = _tiny()
    value_and_grad = jax.jit(jax.value_and_grad(_tiny_loss))

    def train(tx: Any) -> Any:
        p, s = params, tx.init(params)
        update = jax.jit(lambda p, s, g, v: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p, value=v)))
        for _ in range(10):
            loss, g = value_and_grad(p, x, y)
            p, s = update(p, s, g, loss)
            if isinstance(tx, gwx.Watched):
                tx.step(s)  # the loss comes from update(..., value=loss)
        return p

    def adam() -> Any:
        return optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(0.1, 0.0, 10))

    plain = train(adam())
    with gwx.watch(adam(), out=tmp_path / "w", quiet=True, flush_every=4) as tx:
        watched = train(tx)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(watched)))
    run = tx.run
    assert len(run.steps) == 10 and run.meta["status"] == "finished" and tx.findings is not None
    np.testing.assert_allclose(run.step_series("lr"), 0.1 - 0.01 * np.arange(10), rtol=1e-5, atol=1e-7)
    assert np.isfinite(run.step_series("loss")).all() and run.step_series("loss_logged").all()
    assert run.streams[0]["optimizer"].startswith("optax (InjectStatefulHyperparamsState, ")
    assert run.streams[0]["optimizer"].endswith(", ScaleByAdamState)")


# ----------------------------------------------------------------------------- the API's edges


def test_reinit_continues_the_record_and_a_crash_is_marked(tmp_path: Path) -> None:
    params, x, y = _tiny()
    with pytest.raises(RuntimeError, match="boom"):
        with gwx.watch(optax.sgd(0.1), out=tmp_path / "r", quiet=True, flush_every=2) as tx:
            for _ in range(2):  # init again: the same stream, its steps counted on
                state = tx.init(params)
                for _ in range(3):
                    _, state = tx.update(_tiny_grad(params, x, y), state, params)  # outside jit: the watch jits it
                    tx.step(state)
            with pytest.raises(gw.GradwatchError, match="another structure"):
                tx.init({"w": jnp.zeros(3)})
            raise RuntimeError("boom")
    run = gw.load_run(tmp_path / "r")
    assert run.meta["status"] == "crashed" and list(run.steps) == list(range(6)) and len(run.streams) == 1


def test_bad_input_says_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(gw.GradwatchError, match="unknown option 'flush'"):
        gwx.watch(optax.sgd(0.1), out=tmp_path / "x", flush=3)
    with pytest.raises(gw.GradwatchError, match="takes no guards="):
        gwx.watch(optax.sgd(0.1), out=tmp_path / "x", guards=[])
    with pytest.raises(gw.GradwatchError, match="takes an optax transformation"):
        gwx.watch(lambda g: g, out=tmp_path / "x")
    with pytest.raises(gw.GradwatchError, match="flush_every must be a positive integer"):
        gwx.watch(optax.sgd(0.1), out=tmp_path / "x", flush_every=0)
    with pytest.raises(gw.GradwatchError, match="'swishy' is not an activation"):
        gwx.watch(optax.sgd(0.1), out=tmp_path / "x", activations={"a": "swishy"})
    tx = gwx.watch(optax.sgd(0.1), out=tmp_path / "x", quiet=True)
    with pytest.raises(gw.GradwatchError, match="hold no floating-point arrays"):
        tx.init({"n": 3})
    with pytest.raises(gw.GradwatchError, match="before tx.init"):
        tx.step(None)
    with pytest.raises(gw.GradwatchError, match="zclip\\(alpha\\) must be between 0 and 1"):
        gwx.zclip(alpha=2)
    tx.close()


def test_without_jax_the_import_says_which_extra_to_install() -> None:
    # torch is blocked too: gradwatch.optax does not need it, and it is slow to import.
    code = ("import sys\nsys.modules['jax'] = None\nsys.modules['torch'] = None\nimport gradwatch\n"
            "try:\n    import gradwatch.optax\nexcept gradwatch.GradwatchError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR gradwatch.optax needs JAX and optax; install them with `pip install gradwatch[jax]`." in out.stdout, out.stderr
