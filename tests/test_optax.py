"""JAX with optax (Flax NNX, Flax Linen, plain pytrees): gradwatch.optax.watch records inside the
jitted step and reads the device once per flush; its optax guards record what they did."""

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

pytestmark = pytest.mark.integration

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
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
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
    assert run.layers[-1].name == "params/Dense_8/kernel" and run.layers[-1].activation is None  # the output
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
        want = {gwx.path_name(p): np.linalg.norm(np.asarray(g, np.float64).ravel()) for p, g in flat}
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


def test_zclip_bounds_an_injected_spike_and_records_it(tmp_path: Path) -> None:
    spike = 20
    tx = gwx.watch(optax.chain(gwx.zclip(warmup=10), optax.sgd(0.05)), out=tmp_path / "z", quiet=True, flush_every=10)
    _tiny_train(tx, 30, {spike: 100.0})
    tx.close()
    run = gw.load_run(tmp_path / "z")
    raw, after = run.step_series("grad_norm"), run.step_series("grad_norm_clipped")
    coef, thr = run.step_series("clip_coef"), run.step_series("clip_threshold")
    assert raw[spike] > 50 * raw[spike - 1]  # the spike is stored as it came
    assert after[spike] <= thr[spike] and after[spike] < 0.1 * raw[spike]
    assert coef[spike] < 0.1 and math.isclose(coef[spike], after[spike] / raw[spike], rel_tol=1e-5)
    assert np.isnan(thr[:10]).all() and np.isfinite(thr[10:]).all()  # no threshold during the warm-up
    others = np.r_[10:spike, spike + 1:30]
    np.testing.assert_allclose(coef[others], 1.0, rtol=1e-6)
    np.testing.assert_allclose(after[:10], raw[:10], rtol=1e-6)
    assert not run.step_series("skipped").any()
    stream = run.streams[0]
    assert stream["guards"][0]["name"] == "ZClip" and stream["guards"][0]["warmup"] == 10
    assert stream["guard_summary"] == ["ZClip(alpha=0.97, z_thresh=2.5, warmup=10, eps=1e-06) acted on 1 of 20 steps"]
    gw.diagnose(run)  # still diagnoses


@pytest.mark.parametrize("form", ["chained", "holding", "apply_if_finite"])
def test_a_nan_step_is_skipped_recorded_and_leaves_params_and_state(form: str, tmp_path: Path) -> None:
    inner = optax.adam(1e-2)
    tx = {"chained": lambda: optax.chain(gwx.skip_nonfinite(), inner),
          "holding": lambda: gwx.skip_nonfinite(inner),
          "apply_if_finite": lambda: optax.apply_if_finite(inner, 3)}[form]()
    w = gwx.watch(tx, out=tmp_path / form, quiet=True, flush_every=5)
    params, state, history = _tiny_train(w, 12, {5: math.nan}, keep=True)
    w.close()
    run = gw.load_run(tmp_path / form)
    skipped = run.step_series("skipped")
    assert list(np.flatnonzero(skipped)) == [5]
    assert not np.isfinite(run.step_series("grad_norm")[5])
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(history[4]), jax.tree.leaves(history[5])))
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    assert int(adam.count) == 11  # the skipped step left Adam's state as it was
    stream = run.streams[0]
    assert stream["guards"][0]["name"] == "SkipNonFinite"
    assert "skipped 1 step with non-finite gradients (at 5)" in stream["guard_summary"][-1]
    nonfinite = [f for f in gw.diagnose(run) if f.kind == "nonfinite"]
    assert all(f.severity != "error" for f in nonfinite)  # contained by the skip


def test_clip_by_global_norm_is_optaxs_own_and_records(tmp_path: Path) -> None:
    params, x, y = _tiny()
    g = jax.grad(_tiny_loss)(params, x, y)
    g = jax.tree.map(lambda a: a * 50.0, g)
    ours, theirs = gwx.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    want, _ = jax.jit(theirs.update)(g, theirs.init(params))
    got, st = jax.jit(ours.update)(g, ours.init(params))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert math.isclose(float(st.record.norm_after), 1.0, rel_tol=1e-6) and float(st.record.threshold) == 1.0
    ours, theirs = gwx.adaptive_grad_clip(0.01), optax.adaptive_grad_clip(0.01)
    want, _ = jax.jit(theirs.update)(g, theirs.init(params), params)
    got, st = jax.jit(ours.update)(g, ours.init(params), params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert bool(st.record.acted) and float(st.record.norm_after) < float(optax.tree.norm(g))


def test_agc_and_autoclip_follow_the_torch_guards_math() -> None:
    params, x, y = _tiny()
    g = jax.tree.map(lambda a: a * 30.0, jax.grad(_tiny_loss)(params, x, y))
    agc = gwx.agc(0.01, exclude=["l2"])
    out, st = agc.update(g, agc.init(params), params)
    w, gw1 = np.asarray(params["l1"]["w"], np.float64), np.asarray(g["l1"]["w"], np.float64)
    bound = np.maximum(np.linalg.norm(w, axis=0), 1e-3) * 0.01  # a unit: one output column of a (in, out) kernel
    gn = np.linalg.norm(gw1, axis=0)
    expect = np.where(gn > bound, gw1 * bound / np.maximum(gn, 1e-6), gw1)
    np.testing.assert_allclose(out["l1"]["w"], expect, rtol=1e-5)
    b, gb = np.asarray(params["l1"]["b"]), np.asarray(g["l1"]["b"])  # a bias: element-wise
    np.testing.assert_allclose(out["l1"]["b"], np.clip(gb, -np.maximum(np.abs(b), 1e-3) * 0.01,
                                                       np.maximum(np.abs(b), 1e-3) * 0.01), rtol=1e-5)
    assert np.array_equal(out["l2"]["w"], g["l2"]["w"])  # excluded
    norms = []
    ac = gwx.autoclip(percentile=25, history=8)
    s = ac.init(params)
    for k in range(12):
        gk = jax.tree.map(lambda a: a * (1 + k % 5), g)
        norms.append(float(optax.tree.norm(gk)))
        _, s = ac.update(gk, s)
        assert math.isclose(float(s.record.threshold), float(np.percentile(norms[-8:], 25)), rel_tol=1e-5)


def test_watching_changes_nothing(tmp_path: Path) -> None:
    # Gradients from one jitted function, the update in another (see the module's note on XLA fusion).
    params, x, y = _tiny()
    grad_fn = jax.jit(jax.grad(_tiny_loss))

    def train(tx: Any) -> Any:
        p, s = params, tx.init(params)
        update = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
        for _ in range(10):
            p, s = update(p, s, grad_fn(p, x, y))
            if isinstance(tx, gwx.Watched):
                tx.step(s)
        return p

    plain = train(optax.adam(1e-2))
    tx = gwx.watch(optax.adam(1e-2), out=tmp_path / "w", quiet=True, flush_every=4)
    watched = train(tx)
    tx.close()
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(watched)))
    assert len(tx.run.steps) == 10 and tx.findings is not None


# ----------------------------------------------------------------------------- the API's edges


def test_lr_of_inject_hyperparams_and_loss_from_value(tmp_path: Path) -> None:
    params, x, y = _tiny()
    sched = optax.linear_schedule(0.1, 0.0, 10)
    with gwx.watch(optax.inject_hyperparams(optax.sgd)(learning_rate=sched), out=tmp_path / "lr", quiet=True) as tx:
        state = tx.init(params)
        upd = jax.jit(tx.update)
        for _ in range(4):
            loss, g = jax.value_and_grad(_tiny_loss)(params, x, y)
            u, state = upd(g, state, params, value=loss)
            params = optax.apply_updates(params, u)
            tx.step(state)
    run = gw.load_run(tmp_path / "lr")
    np.testing.assert_allclose(run.step_series("lr"), [0.1, 0.09, 0.08, 0.07], rtol=1e-6)
    assert np.isfinite(run.step_series("loss")).all() and run.step_series("loss_logged").all()
    assert run.meta["status"] == "finished"


def test_context_manager_marks_a_crash_and_keeps_the_steps(tmp_path: Path) -> None:
    params, x, y = _tiny()
    with pytest.raises(RuntimeError):
        with gwx.watch(optax.sgd(0.1), out=tmp_path / "c", quiet=True, flush_every=3) as tx:
            state = tx.init(params)
            for i in range(5):
                g = jax.grad(_tiny_loss)(params, x, y)
                u, state = tx.update(g, state, params)  # eager: no jit at all
                params = optax.apply_updates(params, u)
                tx.step(state)
            raise RuntimeError("boom")
    run = gw.load_run(tmp_path / "c")
    assert run.meta["status"] == "crashed" and len(run.steps) == 5


def test_reinit_continues_the_record_and_refuses_another_tree(tmp_path: Path) -> None:
    params, x, y = _tiny()
    tx = gwx.watch(optax.sgd(0.1), out=tmp_path / "r", quiet=True)
    for _ in range(2):
        state = tx.init(params)
        for _ in range(3):
            u, state = tx.update(jax.grad(_tiny_loss)(params, x, y), state, params)
            tx.step(state)
    with pytest.raises(gw.GradwatchError, match="another structure"):
        tx.init({"w": jnp.zeros(3)})
    tx.close()
    assert list(tx.run.steps) == list(range(6))


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
    code = ("import sys\nsys.modules['jax'] = None\nimport gradwatch\n"
            "try:\n    import gradwatch.optax\nexcept gradwatch.GradwatchError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR gradwatch.optax needs JAX and optax; install them with `pip install gradwatch[jax]`." in out.stdout, out.stderr
