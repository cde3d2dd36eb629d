"""The HTML report: self-contained, escaped, readable for deep models, and rendered by a real browser."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.report.html import write_report
from models import mlp, train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def record(tmp_path: Path, model: nn.Module, steps: int = 40, lr: float = 0.1, before_step=None) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with gw.watch(model, opt, out=out, quiet=True, sample_every=5) as w:
        train(model, opt, steps, before_step=before_step, on_step=lambda loss: w.log(loss=loss))
    return out


def vanishing(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Sigmoid()]
    for _ in range(6):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return record(tmp_path, nn.Sequential(*layers, nn.Linear(16, 3)), steps=60)


def exploding(tmp_path: Path) -> Path:
    """Seed 001's run: unscaled regression targets, SGD with momentum: explodes, then NaN."""
    from scenarios import exploding_unscaled_targets

    out = tmp_path / "run"
    exploding_unscaled_targets(out)
    return out


def healthy(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return record(tmp_path, mlp(depth=2), steps=40, lr=0.05)


CASES = {"vanishing": vanishing, "exploding": exploding, "healthy": healthy}


@pytest.mark.parametrize("case", list(CASES))
def test_report_is_self_contained_and_shows_the_findings(case: str, tmp_path: Path) -> None:
    out = CASES[case](tmp_path)
    path = write_report(out)
    page = path.read_text()
    assert path == out / "report.html"
    assert "http://" not in page and "https://" not in page and "<script" not in page  # no network, no JS
    assert page.count("data:image/png;base64,") >= 5
    kinds = [f.kind for f in gw.load_run(out).findings if f.severity != "info"]
    if case == "healthy":
        assert kinds == [] and "No problems found" in page
    else:
        assert kinds and all(k in page for k in kinds)
    if case == "exploding":
        assert "nonfinite" in kinds and "&quot;origin&quot;: &quot;weights&quot;" in page  # evidence, escaped


def test_layer_names_are_text_not_markup(tmp_path: Path) -> None:
    class Evil(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 3)

    model = Evil()
    setattr(model, "<script>alert(1)</script>", nn.Linear(3, 3))  # a module name no one should trust
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = tmp_path / "run"
    with gw.watch(model, opt, out=out, quiet=True):
        for _ in range(3):
            loss = getattr(model, "<script>alert(1)</script>")(model.body(torch.randn(4, 8))).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    page = write_report(out).read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_300_layer_model_gives_a_page_of_a_few_mb(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), *[nn.Linear(4, 4) for _ in range(148)], nn.Linear(4, 3))  # 300 tensors
    out = record(tmp_path, model, steps=30, lr=0.01)
    assert len(gw.load_run(out).layers) == 300
    path = write_report(out)
    assert path.stat().st_size < 3_000_000


def test_report_command(tmp_path: Path) -> None:
    out = healthy(tmp_path)
    result = subprocess.run([sys.executable, "-m", "gradwatch", "report", str(out), "--out", str(tmp_path / "r.html")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.html").stat().st_size > 10_000 and "report written to" in result.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("case", list(CASES))
def test_chromium_renders_the_report(case: str, tmp_path: Path) -> None:
    path = write_report(CASES[case](tmp_path))
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--window-size=1200,1600", f"--screenshot={shot}", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.exists(), result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert console == []  # no console messages at all: no errors
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] == 1600 and pixels.shape[1] == 1200
    assert np.std(pixels[..., :3]) > 0.05  # not a blank page


def test_watch_writes_the_report_when_it_closes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.watch(model, opt, out=tmp_path / "run", quiet=True, report=True) as w:
        train(model, opt, 10, on_step=lambda loss: w.log(loss=loss))
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000


def test_compare_puts_runs_side_by_side(tmp_path: Path) -> None:
    a, b = vanishing(tmp_path / "a"), healthy(tmp_path / "b")
    page = tmp_path / "cmp.html"
    env = {**__import__("os").environ, "COLUMNS": "200"}  # one table row per line
    result = subprocess.run([sys.executable, "-m", "gradwatch", "compare", str(a), str(b), "--out", str(page)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "vanishing_gradients (warning)" in result.stdout or "vanishing_gradients (error)" in result.stdout
    assert "none" in result.stdout and "a/run" in result.stdout and "b/run" in result.stdout
    html_text = page.read_text()
    assert html_text.count("data:image/png;base64,") == 2 and "<script" not in html_text


def test_the_flow_heatmap_of_a_run_without_any_gradient_says_so() -> None:
    """An all-zero run has nothing to colour: the plot says why instead of drawing an empty frame."""
    import numpy as np

    from gradwatch.report.plots import gradient_flow_heatmap
    from gradwatch.store import LayerInfo
    from test_diagnose import FakeRun

    run = FakeRun(30, [LayerInfo("0.weight", (4, 2), 8, "Linear", None), LayerInfo("2.weight", (1, 4), 4, "Linear", "Softmax")])
    run.layer["grad_rms"][:] = 0.0
    run.step["grad_norm"][:] = 0.0
    run.step["loss"][:] = 0.7
    fig = gradient_flow_heatmap(run)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["every recorded gradient is exactly zero"]
    assert np.allclose(fig.axes[0].get_xlim(), (0, 30))
