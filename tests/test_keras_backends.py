"""Seeds 000, 001 and 004 as Keras 3 programs (Sequential, compile, fit with GradWatch) on TensorFlow
and on JAX, and ``gradwatch demo --backend``.

KERAS_BACKEND is read once per process (and this one runs Keras on torch), so each backend trains
in one child process (``python -m gradwatch.scenarios.keras_seeds``, started by the demo's own
code) the five variants the tests read, on short budgets. The JAX child, the TensorFlow child and
the PyTorch side of ``demo --backend tensorflow`` run at the same time, once for the whole file.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import gradwatch as gw
from gradwatch.scenarios import keras_seeds
from gradwatch.scenarios.keras_seeds import VariantResult

#: The variants the tests read: each seed's failing run and a healthy one.
VARIANTS = ("moons/baseline sigmoid", "moons/relu", "regression/no clipping", "circles/sigmoid", "circles/tanh")
EPOCHS = 4  # moons 376 steps, circles 128 (vanishing is judged on the first 100), regression 64 (NaN by step 10)
BACKENDS = ("tensorflow", "jax")

needs_backend = {b: pytest.mark.skipif(keras_seeds.backend_error(b) is not None, reason=f"Keras on {b} not installed")
                 for b in BACKENDS}


@dataclass
class Runs:
    """The module's one training of everything, shared by its tests."""

    tf_demo: list[Any]  # run_backend_demo("tensorflow", ...)'s comparisons
    tf_text: str  # what it printed
    tf_json: dict[str, Any]  # its child's JSON
    jax_child: Any  # KerasChild on JAX, started before the TensorFlow demo (the three run at once)
    _jax: dict[str, Any] | None = None

    def json(self, backend: str) -> dict[str, Any]:
        if backend == "tensorflow":
            return self.tf_json
        if self._jax is None:
            self._jax = self.jax_child.wait(timeout=300)
        return self._jax


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The JAX child starts first; then ``gradwatch demo --backend tensorflow``'s function trains the
    PyTorch variants here while its own child trains the Keras ones on TensorFlow."""
    from gradwatch.scenarios.demo import run_backend_demo, start_keras_subprocess

    root = tmp_path_factory.mktemp("keras-backends")
    jax_child = None
    if keras_seeds.backend_error("jax") is None:
        jax_child = start_keras_subprocess("jax", [], root / "jax", epochs=EPOCHS, only=VARIANTS)
    try:
        tf_demo, text, doc = [], "", {}
        if keras_seeds.backend_error("tensorflow") is None:
            buf = io.StringIO()
            tf_demo = run_backend_demo("tensorflow", [], root / "demo", epochs=EPOCHS, only=VARIANTS,
                                       console=Console(file=buf, width=240, highlight=False),
                                       flush_every=50, sample_every=50)
            text = buf.getvalue()
            doc = json.loads((root / "demo" / "keras-tensorflow" / "results.json").read_text())
        yield Runs(tf_demo, text, doc, jax_child)
    finally:
        if jax_child is not None:
            jax_child.kill()


def results(runs: Runs, backend: str) -> dict[str, dict[str, VariantResult]]:
    doc = runs.json(backend)
    assert doc["backend"] == backend
    return {name: {r.label: r for r in rs} for name, rs in keras_seeds.results_from_json(doc).items()}


def kinds(r: VariantResult) -> set[str]:
    return {f.split(" (")[0] for f in r.findings}


backend_params = [pytest.param(b, marks=[needs_backend[b], pytest.mark.integration]) for b in BACKENDS]


@pytest.mark.parametrize("backend", backend_params)
def test_seed_000_sigmoid_moons_vanish_relu_is_clean(runs: Runs, backend: str) -> None:
    moons = results(runs, backend)["moons"]
    base, relu = moons["baseline sigmoid"], moons["relu"]
    assert "vanishing_gradients (warning)" in base.findings or "vanishing_gradients (error)" in base.findings
    assert relu.findings == [], relu.findings
    assert relu.flow > base.flow
    assert base.steps == relu.steps == EPOCHS * 94  # ceil(3000 / 32) steps an epoch
    assert base.first_nonfinite_step is None and 0.5 <= base.score <= 1.0
    # The stored run says which backend recorded it, and diagnoses the same way when read back.
    run = gw.load_run(base.out)
    assert run.meta["framework"]["name"] == backend
    assert len(run.steps) == base.steps
    assert "vanishing_gradients" in {f.kind for f in gw.diagnose(run)}
    assert {layer.module_type for layer in run.layers} == {"Dense"}
    assert [layer.activation for layer in run.layers][:2] == ["Sigmoid", "Sigmoid"]


@pytest.mark.parametrize("backend", backend_params)
def test_seed_001_unscaled_regression_explodes(runs: Runs, backend: str) -> None:
    r = results(runs, backend)["regression"]["no clipping"]
    assert kinds(r) & {"exploding_gradients", "nonfinite"}, r.findings
    assert all(f.endswith("(warning)") or f.endswith("(error)") for f in r.findings)
    assert r.first_nonfinite_step is not None and r.first_nonfinite_step < 20
    assert math.isnan(r.score) and r.metric == "mse"


@pytest.mark.parametrize("backend", backend_params)
def test_seed_004_sigmoid_normal_init_vanishes_tanh_is_clean(runs: Runs, backend: str) -> None:
    circles = results(runs, backend)["circles"]
    sigmoid, tanh = circles["sigmoid"], circles["tanh"]
    assert "vanishing_gradients" in kinds(sigmoid), sigmoid.findings
    assert sigmoid.flow < 0.1
    assert tanh.findings == [], tanh.findings
    assert tanh.first_nonfinite_step is None and tanh.score > sigmoid.score


@pytest.mark.integration
@needs_backend["tensorflow"]
def test_demo_backend_tensorflow_prints_both_tables_and_the_same_conclusions(runs: Runs) -> None:
    text = runs.tf_text
    assert [c.scenario.seed_article for c in runs.tf_demo] == ["000", "001", "004"]
    for c in runs.tf_demo:
        title = f"seed {c.scenario.seed_article} · {c.scenario.name} · {EPOCHS} epochs"
        assert f"{title} · PyTorch" in text and f"{title} · Keras 3 on TensorFlow" in text
        assert [r.label for r in c.torch] == [r.label for r in c.keras]  # the same variants on both sides
        assert c.same_conclusions, [(a.label, a.torch, a.keras, a.verdict) for a in c.agreements]
    assert text.count("conclusions: PyTorch vs Keras 3 on TensorFlow") == 3
    assert text.count("same conclusions on PyTorch and Keras 3 on TensorFlow") == 3
    assert "NaN at step" in text and "vanishing_gradients (warning)" in text


@pytest.mark.integration
@needs_backend["tensorflow"]
def test_cli_demo_backend_flag_runs_the_backend_demo(runs: Runs, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`gradwatch demo --backend tensorflow regression`: the child's results (here the fixture's,
    instead of a second child) beside PyTorch's, and a summary line."""
    from gradwatch import cli
    from gradwatch.scenarios import demo

    calls = []

    class Done:
        def wait(self, console: Any = None, timeout: Any = None) -> dict:
            return runs.tf_json

        def kill(self) -> None:
            pass

    def fake_child(backend: str, names: Any, out: Any, **kwargs: Any) -> Done:
        calls.append((backend, list(names), kwargs.get("epochs")))
        return Done()

    monkeypatch.setattr(demo, "start_keras_subprocess", fake_child)
    buf = io.StringIO()
    monkeypatch.setattr(cli, "_err", Console(file=buf, width=240, highlight=False))
    code = cli.main(["demo", "--backend", "tensorflow", "regression", "--epochs", "2", "--out", str(tmp_path / "d")])
    text = buf.getvalue()
    assert code == 0, text
    assert calls == [("tensorflow", ["regression"], 2)]
    assert "seed 001 · regression · 2 epochs · PyTorch" in text
    assert "Keras 3 on TensorFlow" in text and "clipvalue 5.0 + clipnorm 1.0" in text  # PyTorch's own variant too
    assert "Same conclusions on PyTorch and Keras 3 on TensorFlow: 1 of 1 seeds." in text


# ---------------------------------------------------------------------------- cheap: no training


def test_demo_without_the_backend_framework_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from gradwatch.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("jax", "tensorflow") else
                        real(name, *a))
    for backend in BACKENDS:
        assert main(["demo", "--backend", backend, "--out", "unused"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("gradwatch: error: ")
        assert f"`pip install gradwatch[{backend}]`" in err


def test_demo_backend_defaults_to_torch_and_rejects_others() -> None:
    from gradwatch.cli import build_parser

    assert build_parser().parse_args(["demo"]).backend == "torch"
    assert build_parser().parse_args(["demo", "--backend", "jax", "moons"]).backend == "jax"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--backend", "mxnet"])


def test_demo_backend_names_only_the_keras_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    from gradwatch.cli import main

    if keras_seeds.backend_error("tensorflow") is not None:
        pytest.skip("Keras on tensorflow not installed")
    assert main(["demo", "--backend", "tensorflow", "grid", "--out", "unused"]) == 2
    assert "no Keras version of scenario 'grid'" in capsys.readouterr().err


def test_keras_seeds_imports_without_torch_or_keras() -> None:
    code = textwrap.dedent("""\
        import json, sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError(f"torch is blocked in this test ({name})")
                return None

        sys.meta_path.insert(0, NoTorch())
        from gradwatch.scenarios import keras_seeds as ks
        print(json.dumps({"scenarios": {n: [v.label for v in s.variants] for n, s in ks.SCENARIOS.items()},
                          "keras_imported": "keras" in sys.modules, "torch_imported": "torch" in sys.modules}))
        """)
    src = str(Path(keras_seeds.__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert not out["keras_imported"] and not out["torch_imported"]
    assert list(out["scenarios"]) == ["moons", "regression", "circles"]


def test_the_keras_variants_are_the_torch_ones() -> None:
    """Labels line up with the PyTorch scenarios (the demo pairs rows by label); what Keras 3 cannot
    express (clipvalue and clipnorm together) is the one PyTorch-only variant."""
    from gradwatch.scenarios.seeds import SCENARIOS

    for name, ks in keras_seeds.SCENARIOS.items():
        ts = SCENARIOS[name]
        assert ks.seed_article == ts.seed_article and ks.epochs == ts.epochs and ks.full_epochs == ts.full_epochs
        torch_labels = [v.label for v in ts.variants]
        keras_labels = [v.label for v in ks.variants]
        assert set(keras_labels) <= set(torch_labels)
        assert set(torch_labels) - set(keras_labels) <= {"clipvalue 5.0 + clipnorm 1.0"}
        assert {v.label: v.full_only for v in ks.variants} == {v.label: v.full_only for v in ts.variants
                                                                if v.label in keras_labels}


def test_compare_conclusions_reads_kinds_and_the_seeds_verdict() -> None:
    from gradwatch.scenarios.demo import compare_conclusions

    def r(label: str, *found: str) -> VariantResult:
        return VariantResult(label, "mse", 1.0, 1.0, None, 0.5, list(found), 10, 0.1, "", "")

    torch = [r("no clipping", "exploding_gradients (error)", "nonfinite (error)"), r("clipnorm 1.0"),
             r("clipvalue 5.0", "loss_plateau (warning)"), r("clipvalue 5.0 + clipnorm 1.0")]
    keras = [r("no clipping", "nonfinite (error)", "exploding_gradients (warning)"), r("clipnorm 1.0"),
             r("clipvalue 5.0", "loss_plateau (warning)")]
    rows = {a.label: a.verdict for a in compare_conclusions("regression", torch, keras)}
    assert rows == {"no clipping": "same", "clipnorm 1.0": "same", "clipvalue 5.0": "not as the seed",
                    "clipvalue 5.0 + clipnorm 1.0": "one side"}
    keras[0] = r("no clipping", "nonfinite (error)")
    assert compare_conclusions("regression", torch, keras)[0].verdict == "differs"
