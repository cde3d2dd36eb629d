"""The probe: exact statistics, zero host syncs per step, and training left untouched."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from models import ARCHITECTURES, OddParams, SmallTransformer, make, mlp, train
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch as gw
from gradwatch.probe.torch import (
    SATURATION_THRESHOLD,
    ProbeConfig,
    TorchProbe,
    build_layer_table,
)
from gradwatch.store import HIST_EXP_MAX, HIST_EXP_MIN

aten = torch.ops.aten


# ------------------------------------------------------------------------------ exact statistics


class Reference:
    """Copies every gradient and weight to float64 numpy around each step, by hooks of its own."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.params = [p for _, p in model.named_parameters()]  # named_parameters() drops tied duplicates
        self.grads: list[list[np.ndarray | None]] = []
        self.before: list[list[np.ndarray]] = []
        self.after: list[list[np.ndarray]] = []
        self.outputs: list[dict[int, list[np.ndarray]]] = []  # per step: weight id -> pre-activations
        self._current: dict[int, list[np.ndarray]] = {}
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.register_forward_hook(self._forward)

    def _forward(self, module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        x = output.detach().double().numpy()
        unit_axis = x.ndim - 1 if isinstance(module, torch.nn.Linear) else 1
        self._current.setdefault(id(module.weight), []).append(np.moveaxis(x, unit_axis, 0).reshape(x.shape[unit_axis], -1))

    def _pre(self, *_: object) -> None:
        self.outputs.append(self._current)
        self._current = {}
        self.grads.append([None if p.grad is None else p.grad.detach().double().numpy().copy() for p in self.params])
        self.before.append([p.detach().double().numpy().copy() for p in self.params])

    def _post(self, *_: object) -> None:
        self.after.append([p.detach().double().numpy().copy() for p in self.params])

    def activation(self, metric: str, step: int, i: int, act: str | None) -> float:
        outs = self.outputs[step].get(id(self.params[i]))
        if not outs:
            return np.nan
        x = np.concatenate(outs, axis=1)  # units x (all values of every forward of the step)
        if metric == "act_dead_frac":
            return float(np.mean(x.max(axis=1) <= 0))
        if metric == "act_const_frac":  # every value of the unit the same (needs more than one value)
            return float(np.mean(x.max(axis=1) == x.min(axis=1))) if x.shape[1] > 1 else np.nan
        threshold = SATURATION_THRESHOLD.get(act or "")
        return np.nan if threshold is None else float(np.mean(np.abs(x) > threshold))

    def layer(self, metric: str, step: int, i: int) -> float:
        g, w, w1 = self.grads[step][i], self.before[step][i], self.after[step][i]
        if metric.startswith("grad_"):
            if g is None:
                return np.nan
            x = g.ravel()
        else:
            x = w.ravel()
        n = x.size
        with np.errstate(all="ignore"):
            kind = metric.split("_", 1)[1]
            if metric == "update_ratio":
                return float(np.linalg.norm(w1 - w) / np.linalg.norm(w))
            if kind == "norm":
                return float(np.sqrt(np.sum(x * x)))
            if kind == "rms":
                return float(np.sqrt(np.sum(x * x)) / np.sqrt(n)) if n else np.nan
            if kind == "mean":
                return float(np.sum(x) / n) if n else np.nan
            if kind == "std":
                return float(np.sqrt(np.mean((x - x.mean()) ** 2))) if n else np.nan
            if kind == "maxabs":
                return float(np.max(np.abs(x))) if n and not np.isnan(x).any() else np.nan
            if kind == "nonfinite":
                return float(not np.all(np.isfinite(x)))
            if kind == "zero_frac":
                return float(np.mean(x == 0)) if n else np.nan
        raise KeyError(metric)


SAMPLED = {"act_dead_frac", "act_sat_frac", "act_const_frac", "grad_mean", "grad_maxabs", "grad_std", "grad_zero_frac",
           "weight_norm", "weight_rms", "weight_mean", "weight_std", "update_ratio"}


def assert_matches_reference(run: gw.Run, ref: Reference, sample_every: int) -> int:
    """Every stored statistic equals the float64 reference to 1e-5 relative; returns values checked."""
    names = [layer.name for layer in run.layers]
    sampled = ProbeConfig(sample_every=sample_every).is_sampled
    checked = 0
    for metric in gw.LAYER_METRICS:
        series = run.layer_series(metric)
        for row, step in enumerate(run.steps):
            if metric in SAMPLED and not sampled(step):
                assert np.all(np.isnan(series[row])), f"{metric} at unsampled step {step} should be NaN"
                continue
            if metric.startswith("act_"):
                expected = np.array([ref.activation(metric, step, i, run.layers[i].activation) for i in range(len(names))])
            else:
                expected = np.array([ref.layer(metric, step, i) for i in range(len(names))])
            np.testing.assert_allclose(
                series[row], expected, rtol=1e-5, atol=1e-30, equal_nan=True,
                err_msg=f"{metric} at step {step} ({names})",
            )
            checked += int(np.isfinite(expected).sum())
    return checked


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "odd"])
def test_every_statistic_equals_float64_reference(arch: str, tmp_path: Path) -> None:
    model = make(arch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref = Reference(model, opt)  # registered first, so its pre-hook sees the same gradients
    with gw.watch(model, opt, out=tmp_path / "run", flush_every=4, sample_every=3, quiet=True) as w:
        train(model, opt, 10, on_step=lambda loss: w.log(loss=loss))
    run = gw.load_run(tmp_path / "run")
    assert list(run.steps) == list(range(10))
    assert assert_matches_reference(run, ref, sample_every=3) > 100
    # The global norm is the clip_grad_norm_ one: over all layers with a gradient.
    expected = [np.sqrt(sum(np.sum(g * g) for g in gs if g is not None)) for gs in ref.grads]
    np.testing.assert_allclose(run.step_series("grad_norm"), expected, rtol=1e-5)


def test_corner_case_layers_are_named_and_counted_once(tmp_path: Path) -> None:
    model = OddParams()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with gw.watch(model, opt, out=tmp_path / "run", quiet=True, sample_every=1) as w:
        train(model, opt, 3, on_step=lambda loss: w.log(loss=loss))
    run = gw.load_run(tmp_path / "run")
    names = [layer.name for layer in run.layers]
    assert names.count("embed.weight") == 1 and "head.weight" not in names  # tied: once, first name
    frozen = run.layer_index("frozen.weight")
    assert run.layers[frozen].trainable is False
    assert np.all(np.isnan(run.layer_series("grad_norm")[:, frozen]))  # no gradient: not computed
    assert np.all(np.isfinite(run.layer_series("weight_norm")[:, frozen]))  # but its weights are watched
    empty = run.layer_index("empty")
    assert run.layers[empty].numel == 0
    assert np.all(run.layer_series("grad_norm")[:, empty] == 0)
    assert np.all(run.layer_series("grad_nonfinite")[:, empty] == 0)
    norm_w = run.layer_index("norm.weight")
    # LayerNorm's weight starts as ones: its std is exactly 0 (centred norm, no E[x^2]-mean^2 cancellation)
    assert run.layer_series("weight_std")[0, norm_w] == 0.0
    assert run.layers[run.layer_index("body.weight")].module_type == "Linear"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradients_are_flagged_and_stored(bad: float, tmp_path: Path) -> None:
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = Reference(model, opt)
    target = model[2].weight

    def inject(step: int) -> None:
        if step == 3:
            target.grad[0, 0] = bad

    with gw.watch(model, opt, out=tmp_path / "run", flush_every=4, sample_every=1, quiet=True):
        train(model, opt, 6, before_step=inject)
    run = gw.load_run(tmp_path / "run")
    i = run.layer_index("2.weight")
    flags = run.layer_series("grad_nonfinite")
    assert flags[3, i] == 1 and flags[2, i] == 0
    assert flags[3, run.layer_index("0.weight")] == 0
    assert not np.isfinite(run.layer_series("grad_norm")[3, i])
    assert not np.isfinite(run.step_series("grad_norm")[3])
    if not np.isnan(bad):
        assert run.layer_series("grad_maxabs")[3, i] == np.inf
    assert_matches_reference(run, ref, sample_every=1)


def expected_hist(g: np.ndarray) -> np.ndarray:
    """The stored log2 bins, computed with numpy's frexp: |g| = m * 2^e, m in [0.5, 1)."""
    x = np.abs(g.astype(np.float32).ravel()).astype(np.float64)
    finite_nonzero = np.isfinite(x) & (x > 0)
    e = np.full(x.shape, HIST_EXP_MIN - 1)
    e[finite_nonzero] = np.frexp(x[finite_nonzero])[1] - 1  # floor(log2 |g|)
    e[~np.isfinite(x)] = HIST_EXP_MAX
    bins = np.clip(e - HIST_EXP_MIN + 1, 0, HIST_EXP_MAX - HIST_EXP_MIN + 1)
    return np.bincount(bins, minlength=HIST_EXP_MAX - HIST_EXP_MIN + 2)


def test_histograms_bin_every_element_by_its_exponent(tmp_path: Path) -> None:
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = Reference(model, opt)
    big = model[2].weight

    def inject(step: int) -> None:  # values in the outer bins: zero, tiny, huge, inf, nan
        big.grad[0, :5] = torch.tensor([0.0, 1e-20, 1e6, float("inf"), float("nan")])

    with gw.watch(model, opt, out=tmp_path / "run", sample_every=10, flush_every=7, quiet=True):
        train(model, opt, 25, before_step=inject)
    run = gw.load_run(tmp_path / "run")
    steps, counts, edges = run.histograms()
    assert list(steps) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # dense start, then every 10
    assert len(edges) == counts.shape[2] + 1 and edges[0] == -np.inf and edges[-1] == np.inf
    for row, step in enumerate(steps):
        for i, g in enumerate(ref.grads[step]):
            np.testing.assert_array_equal(counts[row, i], expected_hist(g))
    i = run.layer_index("2.weight")
    zero = run.layer_series("grad_zero_frac")[:, i]
    assert zero[0] == pytest.approx(np.mean(ref.grads[0][i] == 0)) and zero[0] >= 1 / big.numel()


def test_the_accelerator_histogram_counts_as_bincount_does() -> None:
    """Off the CPU the exponent counts come from histc over a fixed range (CUDA's bincount reads its
    input's max on the host: a sync per call); the counts must be bincount's, every bin, edges included."""
    from gradwatch.probe.kernels import EXP_BINS, device_counts

    exp = torch.randint(0, EXP_BINS, (300_000,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    exp[:7], exp[7:11] = EXP_BINS - 1, 0  # both outer bins
    assert torch.equal(device_counts(exp), torch.bincount(exp, minlength=EXP_BINS))
    assert torch.equal(device_counts(exp[:0]), torch.zeros(EXP_BINS, dtype=torch.int64))


# ------------------------------------------------------------------------------ host syncs

SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.item.default}


class SyncCounter(TorchDispatchMode):
    """Counts the dispatcher ops that make the host wait for a device value, and copies into
    the probe's host staging buffer (the device->host transfer)."""

    def __init__(self, staging: torch.Tensor):
        super().__init__()
        self.staging_ptr = staging.data_ptr()
        self.syncs: list[str] = []
        self.transfers = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        if func in SYNC_OPS:
            self.syncs.append(str(func))
        if func is aten.copy_.default and args[0].data_ptr() == self.staging_ptr:
            self.transfers += 1
        return func(*args, **(kwargs or {}))


def _instrument(probe: TorchProbe, log: dict[str, list[SyncCounter]]) -> None:
    """Run each probe entry point under its own counter."""
    for name in ("on_before_optimizer_step", "on_after_optimizer_step", "flush"):
        original = getattr(probe, name)

        def wrapped(*a, _original=original, _name=name, **k):  # type: ignore[no-untyped-def]
            counter = SyncCounter(probe._staging)
            with counter:
                result = _original(*a, **k)
            log[_name].append(counter)
            return result

        setattr(probe, name, wrapped)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_zero_syncs_per_step_and_one_transfer_per_flush(arch: str, tmp_path: Path) -> None:
    model = make(arch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    w = gw.Watch(model, opt, out=tmp_path / "run", flush_every=5, sample_every=2, quiet=True).attach()
    log: dict[str, list[SyncCounter]] = {"on_before_optimizer_step": [], "on_after_optimizer_step": [], "flush": []}
    probe = w.stream(opt).probe
    _instrument(probe, log)
    train(model, opt, 12, on_step=lambda loss: w.log(loss=loss))
    w.close()
    steps = log["on_before_optimizer_step"]
    assert len(steps) == 12 and len(log["on_after_optimizer_step"]) == 12
    # Flushes: at the start of steps 5 and 10 (inside the step hook) and the final one at close.
    flushes = log["flush"]
    assert len(flushes) == 3
    assert all(c.syncs == [] for c in flushes)
    assert [c.transfers for c in flushes] == [1, 1, 1]
    # The per-step work, minus the flushes nested in it, never syncs and never copies to the host.
    for c in steps + log["on_after_optimizer_step"]:
        assert c.syncs == [], c.syncs
    assert all(c.ops > 0 for c in steps)  # the counter did see the probe's device work
    sampled = [ProbeConfig(sample_every=2).is_sampled(i) for i in range(12)]
    assert [c.ops > 0 for c in log["on_after_optimizer_step"]] == sampled and not all(sampled)
    assert sum(c.transfers for c in steps) == 2  # exactly the two nested flushes
    assert len(gw.load_run(tmp_path / "run").steps) == 12


def test_the_counter_catches_a_sync() -> None:
    """The instrument itself works: a Python `if` on a tensor and .item() are seen."""
    x = torch.ones(3)
    with SyncCounter(torch.empty(1)) as c:
        if (x > 0).all():
            pass
        x.sum().item()
    assert len(c.syncs) == 2


def test_probe_source_has_no_scalar_reads() -> None:
    """On CPU `.numpy()`/`.tolist()` of a tensor do not dispatch, so the counter can't see them: read the source
    (every module of gradwatch.probe)."""
    import gradwatch.probe as probe_package

    files = sorted(Path(probe_package.__file__).parent.glob("*.py"))
    assert {"torch.py", "distributed.py"} <= {f.name for f in files}
    src = [line for f in files for line in f.read_text().splitlines()]
    pattern = re.compile(r"\.item\(\)|\.tolist\(\)|\.cpu\(\)|\.numpy\(\)|(?<![\w.])float\(|(?<![\w.])bool\(")
    offenders = [line for line in src if pattern.search(line) and "# sync-ok" not in line]
    assert offenders == []


# ------------------------------------------------------------------------------ training untouched


@pytest.mark.parametrize("arch", ["mlp", "cnn", "transformer", "lstm"])
@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "AdamW"])
def test_final_weights_bit_identical_with_and_without_watch(arch: str, opt_name: str, tmp_path: Path) -> None:
    def run(watched: bool) -> dict[str, torch.Tensor]:
        model = make(arch, seed=3)
        kwargs = {"lr": 0.05, "momentum": 0.9} if opt_name == "SGD" else {"lr": 1e-3}
        opt = getattr(torch.optim, opt_name)(model.parameters(), **kwargs)
        if watched:
            with gw.watch(model, opt, out=tmp_path / "run", flush_every=3, sample_every=2, quiet=True) as w:
                train(model, opt, 8, on_step=lambda loss: w.log(loss=loss))
        else:
            train(model, opt, 8)
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain, watched = run(False), run(True)
    assert plain.keys() == watched.keys()
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k


def test_hooks_attach_on_enter_and_detach_on_exit(tmp_path: Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    w = gw.Watch(model, opt, out=tmp_path / "run", quiet=True)
    assert len(opt._optimizer_step_pre_hooks) == 0
    with w:
        assert len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_step_post_hooks) == 1
    assert len(opt._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_post_hooks) == 0
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    train(model, opt, 2)  # steps after exit are not recorded and do not fail
    assert len(gw.load_run(tmp_path / "run").steps) == 0


def test_loss_is_recorded_on_its_step_without_a_sync(tmp_path: Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses: list[float] = []
    with gw.watch(model, opt, out=tmp_path / "run", flush_every=3, quiet=True) as w:
        def log(loss: torch.Tensor) -> None:
            w.log(loss=loss)
            losses.append(loss.item())
        train(model, opt, 7, on_step=log)
    np.testing.assert_allclose(gw.load_run(tmp_path / "run").step_series("loss"), losses, rtol=1e-6)


def test_learning_rate_follows_the_scheduler(tmp_path: Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with gw.watch(model, opt, out=tmp_path / "run", flush_every=4, quiet=True):
        train(model, opt, 6, on_step=lambda loss: sched.step())
    np.testing.assert_allclose(gw.load_run(tmp_path / "run").step_series("lr"), [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_layer_table_names_modules_and_following_activations() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Sigmoid(),
        torch.nn.Linear(8, 8), torch.nn.Dropout(0.1), torch.nn.Tanh(), torch.nn.Linear(8, 1),
    )
    layers, params = build_layer_table(model, list(model.parameters()))
    table = {layer.name: layer for layer in layers}
    assert table["0.weight"].activation == "Sigmoid"
    assert table["3.weight"].activation == "Tanh"
    assert table["6.weight"].activation is None
    assert table["1.weight"].module_type == "BatchNorm1d"
    assert table["0.weight"].shape == (8, 4) and table["0.weight"].numel == 32
    stray, _ = build_layer_table(SmallTransformer(), list(mlp().parameters()))  # not the model's: by position
    assert [layer.name for layer in stray][:2] == ["param.0", "param.1"] and {layer.module_type for layer in stray} == {"?"}
    t = SmallTransformer()
    enc, _ = build_layer_table(t, list(t.parameters()))
    assert next(layer for layer in enc if layer.name.endswith("layers.0.linear1.weight")).activation == "ReLU"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: gw.watch(torch.nn.ReLU(), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1)), "no parameters"),
        (lambda: gw.watch(mlp(), None), "needs the optimizer"),
        (lambda: gw.watch("model", torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1)), "must be a torch.nn.Module"),
        (lambda: gw.watch(mlp(), "adam"), "must be a torch.optim.Optimizer"),
        (lambda: gw.watch(mlp(), torch.optim.SGD(mlp().parameters(), lr=1), flush_every=0),
         "flush_every must be a positive integer"),
    ],
)
def test_bad_input_gets_one_clear_sentence(call, message: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(gw.GradwatchError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_an_internal_error_stops_recording_but_not_training(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "run", flush_every=2, quiet=True) as w:
        train(model, opt, 3)
        def boom(*args: object) -> None:
            raise RuntimeError("injected")

        w.stream(opt).probe._put = boom  # break the probe (an internal: any error inside it will do)
        train(model, opt, 3)  # must not raise
    assert "stopped recording SGD at step 3" in capsys.readouterr().err
    assert list(gw.load_run(tmp_path / "run").steps) == [0, 1, 2]


def test_to_pandas_gives_a_long_table(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "run", quiet=True):
        train(model, opt, 4)
    run = gw.load_run(tmp_path / "run")
    frame = run.to_pandas(["grad_rms", "weight_norm"])
    assert list(frame.columns) == ["step", "layer", "grad_rms", "weight_norm"]
    assert len(frame) == 4 * len(run.layers)
    first = frame[(frame.step == 2) & (frame.layer == "2.weight")]
    assert first.grad_rms.iloc[0] == run.layer_series("grad_rms")[2, run.layer_index("2.weight")]


def test_layers_follow_the_model_order_not_the_optimizer_order(tmp_path: Path) -> None:
    model = mlp(depth=2)
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[4:]}, {"params": params[:4], "lr": 0.01}], lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "run", quiet=True):
        train(model, opt, 2)
    names = [layer.name for layer in gw.load_run(tmp_path / "run").layers]
    assert names == [name for name, _ in model.named_parameters()]


def test_whole_training_loop_with_activation_hooks_never_syncs(tmp_path: Path) -> None:
    """Forward hooks (sampled steps), backward, SGD and the probe together: zero host syncs."""
    model = mlp(depth=3, act=torch.nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gw.watch(model, opt, out=tmp_path / "run", flush_every=4, sample_every=2, quiet=True)
    counter = SyncCounter(w.stream(opt).probe._staging)
    with counter:
        train(model, opt, 10, on_step=lambda loss: w.log(loss=loss))
    w.close()
    assert counter.syncs == [] and counter.transfers == 2  # flushes at the start of steps 4 and 8
    run = gw.load_run(tmp_path / "run")
    sat = run.layer_series("act_sat_frac")[:, run.layer_index("0.weight")]
    sampled = [ProbeConfig(sample_every=2).is_sampled(s) for s in range(10)]
    assert np.isfinite(sat).tolist() == sampled  # computed on sampled steps only
    assert all(not m._forward_hooks for m in model.modules())  # and taken off again


def test_saturation_matches_the_reference_for_sigmoid_and_tanh(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Sigmoid(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=3.0)  # large pre-activations: saturated
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = Reference(model, opt)
    with gw.watch(model, opt, out=tmp_path / "run", sample_every=1, quiet=True):
        train(model, opt, 4)
    run = gw.load_run(tmp_path / "run")
    assert_matches_reference(run, ref, sample_every=1)
    sat = run.layer_series("act_sat_frac")
    assert np.all(sat[:, run.layer_index("0.weight")] > 0.2) and np.all(sat[:, run.layer_index("2.weight")] > 0.2)
    assert np.all(np.isnan(sat[:, run.layer_index("4.weight")]))  # no saturating activation after it


def test_activation_tap_survives_a_model_moved_after_watch(tmp_path: Path) -> None:
    """The tap's accumulators live on the device the model had when they were made; a model moved
    afterwards (here to "meta", standing in for .cuda()) must not make the forward fail."""
    import gradwatch as gw

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gw.watch(model, opt, out=tmp_path / "r", quiet=True, report=False)
    try:
        model.to("meta")
        out = model(torch.randn(2, 4, device="meta"))  # the tap is attached for step 0's forward
        assert out.shape == (2, 1)
    finally:
        w.detach()


def test_activation_tap_reads_unbatched_conv_input(tmp_path: Path) -> None:
    """Conv1d on an unbatched (C, L) input: units are channels, axis 0 there (axis 1 when batched)."""
    import gradwatch as gw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Flatten(0), nn.Linear(4 * 6, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "c", quiet=True, report=False, sample_every=1):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(3, 8)).sum().backward()
            opt.step()
    dead = gw.load_run(tmp_path / "c").layer_series("act_dead_frac")
    assert np.isfinite(dead[:, 0]).all()  # 0.weight: the Conv1d
