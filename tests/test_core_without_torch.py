"""The core needs no training framework: where `import torch` fails, a stored run is still read,
diagnosed, reported and compared, and the commands that train say in one sentence what is missing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch as gw

from scenarios import circles, deep_sigmoid_mlp  # noqa: E402

BLOCK_TORCH = textwrap.dedent("""\
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test ({name})")
            return None

    sys.meta_path.insert(0, NoTorch())
    """)


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("core") / "run"
    torch.manual_seed(0)
    model = deep_sigmoid_mlp()  # seed 004's 7-layer sigmoid net: its gradients vanish
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = circles()
    with gw.watch(model, opt, out=out, quiet=True, report=False) as w:
        for _ in range(40):
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss)
    return out


def without_torch(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_a_stored_run_is_read_diagnosed_reported_and_compared_without_torch(stored_run: Path) -> None:
    proc = without_torch(f"""
        import json, sys
        import gradwatch as gw
        from gradwatch.cli import main

        run = gw.load_run({str(stored_run)!r})
        kinds = sorted({{f.kind for f in gw.diagnose(run)}})
        codes = [main(["diagnose", {str(stored_run)!r}, "--json"]),
                 main(["report", {str(stored_run)!r}, "--out", "report.html"]),
                 main(["compare", {str(stored_run)!r}, {str(stored_run)!r}, "--out", "compare.html"])]
        print("RESULT", json.dumps({{"steps": len(run.steps), "kinds": kinds, "codes": codes,
                                     "torch": "torch" in sys.modules}}))
        """, stored_run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result == {"steps": 40, "kinds": sorted({f.kind for f in gw.diagnose(gw.load_run(stored_run))}),
                      "codes": [0, 0, 0], "torch": False}
    assert "vanishing_gradients" in result["kinds"]
    assert (stored_run.parent / "report.html").stat().st_size > 10_000
    assert (stored_run.parent / "compare.html").exists()


def test_recording_without_torch_says_what_is_missing_in_one_sentence(tmp_path: Path) -> None:
    proc = without_torch("""
        import gradwatch as gw
        from gradwatch.cli import main
        try:
            gw.watch
        except gw.GradwatchError as e:
            print("API:", e)
        print("CLI:", main(["run", "train.py"]))
        """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "API: gradwatch.watch records PyTorch training and needs PyTorch" in proc.stdout
    assert "pip install gradwatch[torch]" in proc.stdout
    assert "CLI: 2" in proc.stdout
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gradwatch: error: gradwatch run trains with PyTorch")


@pytest.mark.integration
@pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("jax", "keras")),
                    reason="jax or keras is not installed")
def test_keras_on_jax_records_without_torch(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent("""
            import os
            os.environ["KERAS_BACKEND"] = "jax"
            import numpy as np, keras
            import gradwatch as gw
            from gradwatch.keras import GradWatch
            keras.utils.set_random_seed(0)
            m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
            m.compile(optimizer="sgd", loss="mse")
            x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
            m.fit(x, x[:, :1], epochs=2, batch_size=16, verbose=0, callbacks=[GradWatch("run", quiet=True)])
            print("STEPS", len(gw.load_run("run").steps), "TORCH" if "torch" in sys.modules else "NO-TORCH")
            """)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "GRADWATCH_REPORT": "0"})
    assert "STEPS 8 NO-TORCH" in proc.stdout, proc.stdout + proc.stderr[-3000:]
