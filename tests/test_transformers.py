"""Hugging Face Trainer: the callback records a real Trainer's run — before the Trainer's clipping,
once per optimizer step with gradient accumulation — and finds the seeds' problems through it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer refuses to run without it

import gradwatch as gw  # noqa: E402
import gradwatch.transformers as gwt  # noqa: E402
from gradwatch.transformers import GradWatchCallback  # noqa: E402

from scenarios import circles, deep_sigmoid_mlp, regression_001  # noqa: E402

MAX_STEPS = 20
LOGGING_STEPS = 5


@pytest.fixture(autouse=True)
def _one_thread():
    # Models this small train several times faster on one thread than on two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, the labels the inputs (the causal LM shifts them itself)."""

    def __init__(self, n: int = 512, length: int = 16, vocab: int = 64):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class WithLoss(nn.Module):
    """A plain module the Trainer can train: it returns {"loss": ...}."""

    def __init__(self, net: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.net, self.loss_fn = net, loss_fn

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.loss_fn(self.net(x), labels)}


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _train(model: nn.Module, data, out: Path, *, optimizer: torch.optim.Optimizer | None = None,
           callback: GradWatchCallback | None = None, **args):  # type: ignore[no-untyped-def]
    cb = callback or GradWatchCallback(out=out, quiet=True, report=False)
    options = {"max_steps": MAX_STEPS, "per_device_train_batch_size": 8, "logging_steps": LOGGING_STEPS}
    options.update(args)
    targs = transformers.TrainingArguments(output_dir=str(out.parent / f"{out.name}-hf"), report_to=[],
                                           save_strategy="no", use_cpu=True, disable_tqdm=True,
                                           dataloader_pin_memory=False, **options)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=data, callbacks=[cb],
                                   optimizers=(optimizer, None))
    trainer.train()
    return cb, trainer


def _train_logs(trainer) -> list[dict]:  # type: ignore[no-untyped-def]
    return [h for h in trainer.state.log_history if "loss" in h]


def _logged_rows(trainer) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The 0-based optimizer steps the Trainer logged at (its steps count from 1)."""
    return np.array([h["step"] - 1 for h in _train_logs(trainer)])


# ----------------------------------------------------------------------- a transformers model


def test_a_tiny_gpt2_run_is_recorded_with_the_trainers_norm_and_loss(tmp_path: Path) -> None:
    cb, trainer = _train(_gpt2(), Tokens(), tmp_path / "gpt2", learning_rate=1e-3)
    run = gw.load_run(tmp_path / "gpt2")
    names = [layer.name for layer in run.layers]
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.1.mlp.c_proj.bias" in names
    assert run.status == "finished" and len(run.steps) == MAX_STEPS
    assert cb.run_dir == tmp_path / "gpt2" and isinstance(cb.findings, list)
    logs, rows = _train_logs(trainer), _logged_rows(trainer)
    np.testing.assert_array_equal(rows, [4, 9, 14, 19])
    # The norm is read before the Trainer's clipping: the one it returns from clip_grad_norm_ and logs.
    np.testing.assert_allclose(run.step_series("grad_norm")[rows], [h["grad_norm"] for h in logs], rtol=1e-5)
    # The loss is the Trainer's logged loss, at its logging steps only.
    loss = run.step_series("loss")
    np.testing.assert_allclose(loss[rows], [h["loss"] for h in logs], rtol=1e-6)
    assert np.isnan(np.delete(loss, rows)).all()
    # log_to_trainer: the largest norm since the previous log joins the Trainer's own log record.
    norms = run.step_series("grad_norm")
    for h, start in zip(logs, [0, 5, 10, 15]):
        assert h["gradwatch/grad_norm_max"] == pytest.approx(float(norms[start : start + 5].max()), rel=1e-5)
        assert 0.0 <= h["gradwatch/clipped_frac"] <= 1.0
    # ... and the callback sits ahead of the loggers and the progress printer.
    kinds = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert kinds.index("GradWatchCallback") < kinds.index("PrinterCallback")
    meta = json.loads((tmp_path / "gpt2" / "meta.json").read_text())
    assert meta["streams"][0]["trainer"]["recorded"] == gwt.BEFORE_CLIPPING
    assert meta["streams"][0]["optimizer"] == "AdamW"  # the torch optimizer, not accelerate's wrapper
    assert "unscale_gradients" not in vars(trainer.accelerator)  # the wrapper is gone after train()


def test_accumulated_gradients_are_recorded_once_per_optimizer_step(tmp_path: Path) -> None:
    """gradient_accumulation_steps=2: one record per two micro-batches, of the accumulated gradient."""
    _, trainer = _train(_gpt2(), Tokens(), tmp_path / "acc", gradient_accumulation_steps=2, learning_rate=1e-3)
    run = gw.load_run(tmp_path / "acc")
    assert len(run.steps) == MAX_STEPS and run.status == "finished"
    rows = _logged_rows(trainer)
    # The Trainer logs the norm of the gradient it steps with (summed over both micro-batches).
    np.testing.assert_allclose(run.step_series("grad_norm")[rows], [h["grad_norm"] for h in _train_logs(trainer)],
                               rtol=1e-5)


def test_max_grad_norm_shows_the_norm_before_and_after_the_trainers_clipping(tmp_path: Path) -> None:
    _, trainer = _train(_gpt2(), Tokens(), tmp_path / "clip", max_grad_norm=0.5, learning_rate=1e-2)
    run = gw.load_run(tmp_path / "clip")
    pre, post = run.step_series("grad_norm"), run.step_series("grad_norm_clipped")
    assert np.isfinite(pre).all() and np.isfinite(post).all()
    clipped = pre > 0.5
    assert clipped.sum() >= 5, pre  # the test needs steps the clipping acted on
    assert (post <= 0.5 * (1 + 1e-4)).all()
    np.testing.assert_allclose(post[clipped], 0.5, rtol=1e-4)
    np.testing.assert_allclose(post[~clipped], pre[~clipped], rtol=1e-5)
    np.testing.assert_allclose(run.step_series("clip_coef"), post / pre, rtol=1e-4)
    np.testing.assert_array_equal(run.step_series("clip_threshold"), 0.5)
    rows = _logged_rows(trainer)
    np.testing.assert_allclose(pre[rows], [h["grad_norm"] for h in _train_logs(trainer)], rtol=1e-5)
    assert [h["gradwatch/clipped_frac"] for h in _train_logs(trainer)] == [
        float(clipped[s : s + 5].mean()) for s in (0, 5, 10, 15)
    ]


def test_without_clipping_nothing_is_recorded_as_clipped(tmp_path: Path) -> None:
    _, trainer = _train(_gpt2(), Tokens(), tmp_path / "noclip", max_grad_norm=0.0, max_steps=10)
    run = gw.load_run(tmp_path / "noclip")
    assert len(run.steps) == 10 and np.isfinite(run.step_series("grad_norm")).all()
    assert np.isnan(run.step_series("grad_norm_clipped")).all()
    assert all("gradwatch/clipped_frac" not in h for h in _train_logs(trainer))


def test_without_the_trainer_on_the_stack_it_records_after_clipping_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gwt, "_find_trainer", lambda callback: None)
    cb = GradWatchCallback(out=tmp_path / "after", report=False, diagnose_online=False)
    _train(_gpt2(), Tokens(), tmp_path / "after", callback=cb, max_grad_norm=0.5, learning_rate=1e-2, max_steps=10)
    run = gw.load_run(tmp_path / "after")
    assert len(run.steps) == 10
    norm = run.step_series("grad_norm")
    assert (norm <= 0.5 * (1 + 1e-4)).all()  # the clipped gradients
    np.testing.assert_allclose(run.step_series("grad_norm_clipped"), norm, rtol=1e-6)
    assert np.isnan(run.step_series("clip_coef")).all()
    meta = json.loads((tmp_path / "after" / "meta.json").read_text())
    assert meta["streams"][0]["trainer"]["recorded"] == gwt.AFTER_CLIPPING
    assert "after its gradient clipping" in capsys.readouterr().err


class Boom(nn.Module):
    """Raises at the 8th forward pass (the Trainer has no exception event)."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.calls = nn.Linear(2, 1), 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == 8:
            raise RuntimeError("boom")
        return {"loss": nn.functional.binary_cross_entropy_with_logits(self.net(x), labels)}


def test_a_train_that_raised_is_closed_as_crashed_when_the_next_one_begins(tmp_path: Path) -> None:
    x, y = circles(128)
    cb = GradWatchCallback(out=tmp_path / "boom", quiet=True, report=False)
    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        _train(model, Pairs(x, y), tmp_path / "boom", callback=cb, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    cb.out = tmp_path / "again"
    model = Boom()
    _train(model, Pairs(x, y), tmp_path / "again", callback=cb, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
           max_steps=5)
    first, second = gw.load_run(tmp_path / "boom"), gw.load_run(tmp_path / "again")
    assert (first.status, len(first.steps)) == ("crashed", 7)
    assert (second.status, len(second.steps)) == ("finished", 5)


# ----------------------------------------------------------------------- the seeds, through the Trainer


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: Path, optimizer: torch.optim.Optimizer,
         steps: int, **args):  # type: ignore[no-untyped-def]
    return _train(model, Pairs(x, y), out, optimizer=optimizer, max_steps=steps, per_device_train_batch_size=32,
                  logging_steps=10, lr_scheduler_type="constant", **args)


def test_vanishing_sigmoid_net_is_found(tmp_path: Path) -> None:
    x, y = circles()
    model = WithLoss(deep_sigmoid_mlp(), nn.BCEWithLogitsLoss())
    cb, _ = _fit(model, x, y, tmp_path / "sig", torch.optim.SGD(model.parameters(), lr=0.1), steps=320)
    run = gw.load_run(tmp_path / "sig")
    assert run.layers[0].name == "net.0.weight" and run.status == "finished"
    assert "vanishing_gradients" in {f.kind for f in cb.findings}, cb.findings


def test_unscaled_regression_explodes_and_is_found(tmp_path: Path) -> None:
    x, y = regression_001(scale_targets=False)
    torch.manual_seed(1)
    model = WithLoss(nn.Sequential(nn.Linear(20, 25), nn.ReLU(), nn.Linear(25, 1)), nn.MSELoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cb, _ = _fit(model, x, y, tmp_path / "reg", opt, steps=48, max_grad_norm=1e9)  # 1e9: the Trainer never clips
    kinds = {f.kind for f in cb.findings if f.severity == "error"}
    assert {"exploding_gradients", "nonfinite"} & kinds, cb.findings


def test_healthy_run_stays_clean(tmp_path: Path) -> None:
    x, y = regression_001(scale_targets=True)
    torch.manual_seed(2)
    model = WithLoss(nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 1)), nn.MSELoss())
    cb, _ = _fit(model, x, y, tmp_path / "ok", torch.optim.Adam(model.parameters(), lr=1e-2), steps=80)
    assert not [f for f in cb.findings if f.severity in ("warning", "error")], cb.findings
    run = gw.load_run(tmp_path / "ok")
    assert len(run.steps) == 80 and np.isfinite(run.step_series("loss")[9::10]).all()


# ----------------------------------------------------------------------- without the extra


def test_without_transformers_the_import_says_which_extra_to_install() -> None:
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('transformers', 'transformers.trainer_callback'): sys.modules[m] = None\n"
            "import gradwatch\n"
            "try:\n    import gradwatch.transformers\nexcept gradwatch.GradwatchError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    expected = ("ERR gradwatch.transformers needs Hugging Face transformers; "
                "install it with `pip install gradwatch[transformers]`.")
    assert expected in out.stdout, out.stderr
