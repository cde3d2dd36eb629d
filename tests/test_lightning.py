"""Lightning: the callback records a real Trainer's run, with accumulation and gradient clipping."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import gradwatch as gw  # noqa: E402
from gradwatch.lightning import GradWatch  # noqa: E402

from scenarios import circles, deep_sigmoid_mlp, regression_001  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, loss: nn.Module, opt: str = "sgd", lr: float = 0.1, momentum: float = 0.0):
        super().__init__()
        self.net, self.loss_fn, self.opt, self.lr, self.momentum = net, loss, opt, lr, momentum
        self.grads_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return self.loss_fn(self.net(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int = 32) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def _fit(module: pl.LightningModule, loader, out: Path, epochs: int, **trainer_options):  # type: ignore[no-untyped-def]
    cb = GradWatch(out=out, quiet=True, report=False)
    logger = pl.loggers.CSVLogger(out.parent / "logs", name=out.name)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], logger=logger, accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         **trainer_options)
    trainer.fit(module, loader)
    return cb, trainer


def test_vanishing_sigmoid_net_is_found(tmp_path: Path) -> None:
    x, y = circles()
    cb, _ = _fit(Module(deep_sigmoid_mlp(), nn.BCEWithLogitsLoss()), _loader(x, y), tmp_path / "sig", epochs=10)
    run = gw.load_run(tmp_path / "sig")
    assert run.layers[0].name == "net.0.weight" and run.status == "finished"
    assert "vanishing_gradients" in {f.kind for f in cb.findings}


def test_unscaled_regression_explodes_and_is_found(tmp_path: Path) -> None:
    x, y = regression_001(scale_targets=False)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(20, 25), nn.ReLU(), nn.Linear(25, 1))
    cb, _ = _fit(Module(net, nn.MSELoss(), lr=0.01, momentum=0.9), _loader(x, y), tmp_path / "reg", epochs=3)
    kinds = {f.kind for f in cb.findings if f.severity == "error"}
    assert {"exploding_gradients", "nonfinite"} & kinds, cb.findings


def test_healthy_run_stays_clean_and_the_logger_gets_the_norms(tmp_path: Path) -> None:
    x, y = regression_001(scale_targets=True)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 1))
    cb, trainer = _fit(Module(net, nn.MSELoss(), opt="adam", lr=1e-2), _loader(x, y), tmp_path / "ok", epochs=5)
    assert not [f for f in cb.findings if f.severity in ("warning", "error")], cb.findings
    run = gw.load_run(tmp_path / "ok")
    assert len(run.steps) == 5 * 16 and np.isfinite(run.step_series("loss")).all()
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [float(r["gradwatch/grad_norm"]) for r in rows if r.get("gradwatch/grad_norm")]
    np.testing.assert_allclose(logged, run.step_series("grad_norm"), rtol=1e-6)


def test_accumulated_gradients_are_recorded_once_per_optimizer_step(tmp_path: Path) -> None:
    """accumulate_grad_batches=2: one record per two batches, of the summed gradient."""
    x, y = regression_001(scale_targets=True)
    torch.manual_seed(3)
    net = nn.Linear(20, 1)
    module = Module(net, nn.MSELoss(), lr=0.0)  # lr 0: every step sees the same weights
    _fit(module, _loader(x[:128], y[:128]), tmp_path / "acc", epochs=1, accumulate_grad_batches=2)
    run = gw.load_run(tmp_path / "acc")
    assert len(run.steps) == 2  # 4 batches / 2
    # Reference: the accumulated (summed, Lightning scales each micro-batch loss by 1/2) gradient of batches 0 and 1.
    ref = nn.Linear(20, 1)
    ref.load_state_dict(net.state_dict())
    for i in (0, 1):
        (nn.functional.mse_loss(ref(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32]) / 2).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    assert run.step_series("grad_norm")[0] == pytest.approx(float(expected), rel=1e-5)


def test_gradient_clip_val_shows_the_norm_before_and_after(tmp_path: Path) -> None:
    x, y = regression_001(scale_targets=False)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(20, 25), nn.ReLU(), nn.Linear(25, 1))
    _fit(Module(net, nn.MSELoss(), lr=0.01, momentum=0.9), _loader(x, y), tmp_path / "clip", epochs=3,
         gradient_clip_val=1.0)
    run = gw.load_run(tmp_path / "clip")
    pre, post = run.step_series("grad_norm"), run.step_series("grad_norm_clipped")
    assert np.isfinite(pre).all() and (pre > 1).all(), "unscaled targets: every raw norm is far above 1"
    np.testing.assert_allclose(post, 1.0, rtol=1e-4)
    np.testing.assert_array_equal(run.step_series("clip_threshold"), 1.0)
    np.testing.assert_allclose(run.step_series("clip_coef"), post / pre, rtol=1e-4)
    assert math.isfinite(float(run.step_series("loss")[-1]))


def test_without_lightning_the_import_says_which_extra_to_install() -> None:
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('lightning', 'lightning.pytorch', 'lightning.pytorch.callbacks', 'pytorch_lightning', "
            "'pytorch_lightning.callbacks'): sys.modules[m] = None\n"
            "import gradwatch\n"
            "try:\n    import gradwatch.lightning\nexcept gradwatch.GradwatchError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert ("ERR gradwatch.lightning needs Lightning; install it with `pip install gradwatch[lightning]`."
            in out.stdout), out.stderr


def test_with_accumulation_each_step_gets_the_mean_loss_of_its_micro_batches(tmp_path: Path) -> None:
    x, y = regression_001(scale_targets=True)
    torch.manual_seed(4)
    net = nn.Linear(20, 1)
    module = Module(net, nn.MSELoss(), lr=0.0)  # lr 0: each micro-batch's loss is known afterwards
    _fit(module, _loader(x[:128], y[:128]), tmp_path / "acc", epochs=1, accumulate_grad_batches=2)
    run = gw.load_run(tmp_path / "acc")
    with torch.no_grad():
        raw = [float(nn.functional.mse_loss(net(x[i : i + 32]), y[i : i + 32])) for i in range(0, 128, 32)]
    np.testing.assert_allclose(run.step_series("loss"), [(raw[0] + raw[1]) / 2, (raw[2] + raw[3]) / 2], rtol=1e-5)


def test_a_reused_callback_writes_each_fit_to_its_own_run(tmp_path: Path) -> None:
    x, y = regression_001(scale_targets=True)
    torch.manual_seed(5)
    module = Module(nn.Linear(20, 1), nn.MSELoss(), lr=0.01)
    cb = GradWatch(out=tmp_path / "r", quiet=True, report=False)
    for _ in range(2):
        pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, accelerator="cpu", devices=1, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False).fit(module, _loader(x[:64], y[:64]))
    assert gw.load_run(tmp_path / "r").status == gw.load_run(tmp_path / "r-2").status == "finished"
