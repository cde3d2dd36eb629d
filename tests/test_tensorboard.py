"""TensorBoard export: a stored run written as event files and read back with TensorBoard's reader."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.store import AMP_METRICS, GUARD_METRICS, STEP_METRICS, hist_edges

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

from gradwatch.report.tensorboard import HIST_TAG, export_tensorboard  # noqa: E402

N_STEPS = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    out = tmp_path_factory.mktemp("tb") / "run"
    with gw.watch(model, opt, out=out, quiet=True, sample_every=2) as w:
        for _ in range(N_STEPS):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    return gw.load_run(out)


@pytest.fixture(scope="module")
def events(run, tmp_path_factory):
    logdir = export_tensorboard(run, tmp_path_factory.mktemp("tb") / "logs")
    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    )
    acc.Reload()
    return acc


def _scalars(acc, tag):
    ev = acc.Scalars(tag)
    return np.array([e.step for e in ev]), np.array([e.value for e in ev], np.float32)


def test_tags_exist(run, events):
    tags = events.Tags()
    first = run.layers[0].name
    for tag in ("loss", "grad_norm", "lr", f"grad_norm/{first}", f"grad_rms/{first}", f"update_ratio/{first}"):
        assert tag in tags["scalars"], tag
    assert f"{HIST_TAG}/{first}" in tags["histograms"]
    # every step series that is about training (not bookkeeping) is exported; nothing else is
    exported = {t for t in tags["scalars"] if "/" not in t}
    # (what guards did is exported only for runs that had guards; this one has none)
    assert exported == set(STEP_METRICS) - {"time", "sampled", "loss_logged"} - set(GUARD_METRICS) - set(AMP_METRICS)


def test_every_step_scalars_match_the_stored_series(run, events):
    assert len(run.steps) == N_STEPS
    for name in ("loss", "grad_norm", "lr"):
        steps, values = _scalars(events, name)
        np.testing.assert_array_equal(steps, run.steps)
        np.testing.assert_allclose(values, run.step_series(name), rtol=1e-6)
    for metric in ("grad_norm", "grad_rms"):
        stored = run.layer_series(metric)
        for i, layer in enumerate(run.layers):
            steps, values = _scalars(events, f"{metric}/{layer.name}")
            np.testing.assert_array_equal(steps, run.steps)
            np.testing.assert_allclose(values, stored[:, i], rtol=1e-6)


def test_sampled_scalars_only_where_computed(run, events):
    stored = run.layer_series("update_ratio")
    sampled = run.steps[run.step_series("sampled") > 0]
    assert 0 < len(sampled) < len(run.steps)  # the test means something only if some steps are not sampled
    for i, layer in enumerate(run.layers):
        ok = ~np.isnan(stored[:, i])
        steps, values = _scalars(events, f"update_ratio/{layer.name}")
        assert len(steps) == ok.sum() <= len(sampled)
        assert set(steps.tolist()) <= set(sampled.tolist())
        np.testing.assert_array_equal(steps, run.steps[ok])
        np.testing.assert_allclose(values, stored[ok, i], rtol=1e-6)


def test_histograms_keep_the_stored_bins(run, events):
    hsteps, counts, edges = run.histograms()
    assert len(hsteps)
    inner = edges[1:-1]
    width = inner[1] - inner[0]
    for i, layer in enumerate(run.layers):
        hist = events.Histograms(f"{HIST_TAG}/{layer.name}")
        assert [h.step for h in hist] == hsteps.tolist()
        for k, h in enumerate(hist):
            v = h.histogram_value
            c = counts[k, i]
            assert v.num == c.sum() == layer.numel
            nz = np.flatnonzero(c > 0)
            lo, hi = nz[0], nz[-1] + 1
            np.testing.assert_array_equal(v.bucket, c[lo:hi])
            # right edges: the stored ones, the infinite outer edges one bin width beyond the inner ones
            right = np.append(inner, inner[-1] + width)[lo:hi]
            np.testing.assert_allclose(v.bucket_limit, right, rtol=0, atol=1e-12)
            left = np.insert(inner, 0, inner[0] - width)[lo]
            assert v.min == pytest.approx(left) and v.max == pytest.approx(right[-1])
            assert np.isfinite([v.min, v.max, v.sum, v.sum_squares]).all()
    assert np.array_equal(edges, hist_edges())


def test_existing_events_need_overwrite(run, tmp_path):
    logdir = export_tensorboard(run, tmp_path / "logs")
    with pytest.raises(gw.GradwatchError, match="already holds TensorBoard events"):
        export_tensorboard(run, logdir)
    export_tensorboard(run.path, logdir, overwrite=True)  # a run directory's path works too
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1


def test_unknown_metric(run, tmp_path):
    with pytest.raises(gw.GradwatchError, match="unknown layer metric 'grad_nrm'"):
        export_tensorboard(run, tmp_path / "logs", layer_metrics=["grad_nrm"])


def test_missing_tensorboard_is_one_sentence(run, tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "tensorboard" or name.startswith(("tensorboard.", "torch.utils.tensorboard")):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(gw.GradwatchError) as info:
        export_tensorboard(run, tmp_path / "logs")
    assert str(info.value) == (
        "TensorBoard export needs the tensorboard package; install it with `pip install gradwatch[tensorboard]`."
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not (tmp_path / "logs").exists()


def test_watch_option_writes_event_files_at_close(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "run", quiet=True, tensorboard=tmp_path / "tb") as w:
        for _ in range(5):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert len(acc.Scalars("loss")) == 5


def test_guard_records_are_exported(tmp_path):
    from gradwatch.guards import ClipNorm, SkipNonFinite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 1) * 100
    with gw.watch(model, opt, out=tmp_path / "g", quiet=True, report=False, guards=[ClipNorm(0.5), SkipNonFinite()]) as w:
        for _ in range(6):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss)
    logdir = export_tensorboard(tmp_path / "g", tmp_path / "tb")
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    for tag in GUARD_METRICS:
        assert tag in acc.Tags()["scalars"], tag
    post = [e.value for e in acc.Scalars("grad_norm_clipped")]
    assert len(post) == 6 and max(post) == pytest.approx(0.5, rel=1e-5)


_NO_TORCH_CHILD = r"""
import importlib.abc, sys, types

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
        return None

sys.meta_path.insert(0, _NoTorch())
# gradwatch/__init__.py imports the recorder (torch): stand a bare package in for it.
pkg = types.ModuleType("gradwatch")
pkg.__path__ = [sys.argv[1]]
sys.modules["gradwatch"] = pkg

from gradwatch.report.tensorboard import export_tensorboard

export_tensorboard(sys.argv[2], sys.argv[3])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
"""


def test_export_works_without_torch(run, tmp_path):
    import subprocess
    from pathlib import Path

    src = Path(gw.__file__).parent
    logdir = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_CHILD, str(src), str(run.path), str(logdir)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    files = list(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    assert "grad_norm" in acc.Tags()["scalars"]
    assert len(acc.Scalars("grad_norm")) == N_STEPS
