"""gradwatch doctor on Keras 3 scripts: remedies applied the Keras way (gradwatch.keras_treatment).

The doctor runs (each a baseline and its trials, every one a `gradwatch run` subprocess) start
together in child processes, once for the module, so that they share the machine's cores: three on
Keras-on-torch and one on TensorFlow. The unit tests run Keras on torch in this process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("these tests need KERAS_BACKEND=torch", allow_module_level=True)

import torch  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch.doctor import candidates  # noqa: E402
from gradwatch.findings import Finding, Remedy  # noqa: E402
from gradwatch.runner import run_script  # noqa: E402
from gradwatch.scenarios.keras_seeds import backend_error  # noqa: E402
from gradwatch.treatment import Treatment  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent / "keras_doctor_scripts"
#: name -> (script, metric, trials, KERAS_BACKEND)
DOCTORS = {
    "sigmoid": ("sigmoid_circles.py", "accuracy", 2, "torch"),
    "regression": ("unscaled_regression.py", "loss", 2, "torch"),
    "activation_layers": ("activation_layers.py", "accuracy", 2, "torch"),
    "regression_tf": ("unscaled_regression.py", "loss", 2, "tensorflow"),
    "softmax_bce": ("../keras_programs/softmax_one_unit_bce.py", "accuracy", 2, "torch"),
}
DRIVER = """
import dataclasses, json, sys
from gradwatch.doctor import doctor
rep = doctor(sys.argv[1], out=sys.argv[2], metric=sys.argv[3], trials=int(sys.argv[4]))
row = lambda r: None if r is None else {**dataclasses.asdict(r), "out": str(r.out)}
print(json.dumps({"baseline": row(rep.baseline), "trials": [row(t) for t in rep.trials], "best": row(rep.best),
                  "confirmed": row(rep.confirmed), "baseline_full": row(rep.baseline_full), "advice": rep.advice,
                  "compare": str(rep.compare) if rep.compare else None}))
"""


@pytest.fixture(scope="module")
def doctored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every doctor run of DOCTORS, started at once; name -> the report as JSON, with its seconds."""
    root = tmp_path_factory.mktemp("keras-doctor")
    procs = {}
    for name, (script, metric, trials, backend) in DOCTORS.items():
        if backend != "torch" and backend_error(backend) is not None:
            continue
        env = {**os.environ, "KERAS_BACKEND": backend, "GRADWATCH_REPORT": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [sys.executable, "-c", DRIVER, str(SCRIPTS / script), str(root / name), metric, str(trials)]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env),
                       time.perf_counter())
    reports = {}
    for name, (proc, t0) in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        reports[name] = {**json.loads(out.strip().splitlines()[-1]), "seconds": time.perf_counter() - t0}
        print(f"doctor {name}: {reports[name]['seconds']:.1f} s")
    return reports


def _check_fixed(rep: dict[str, Any], problem: str) -> dict[str, Any]:
    """The baseline is a Keras run with ``problem``; the best trial removed it and is confirmed."""
    base, best, conf = rep["baseline"], rep["best"], rep["confirmed"]
    assert base["framework"] == "keras" and problem in base["problems"], base
    trials = [(t["label"], t["code"], t["error"], t["problems"], t["metric"]) for t in rep["trials"]]
    assert best is not None and conf is not None and rep["baseline_full"] is not None, trials
    assert problem not in conf["problems"] and not conf["error"] and conf["finite"], conf
    assert rep["compare"] is not None and Path(rep["compare"]).exists()
    return conf


@pytest.mark.parametrize("name, swapped", [("sigmoid", 4), ("activation_layers", 6)])
def test_doctor_fixes_a_keras_sigmoid_net(doctored: dict[str, Any], name: str, swapped: int) -> None:
    rep = doctored[name]
    conf = _check_fixed(rep, "vanishing_gradients")
    assert rep["best"]["remedies"][0]["action"] == "swap_activation", rep["best"]
    assert conf["metric"] >= rep["baseline_full"]["metric"] + 0.2, (rep["baseline_full"]["metric"], conf["metric"])
    assert f"swap_activations(Sigmoid -> ReLU): changed {swapped}" in conf["applied"], conf["applied"]
    assert any(line.startswith("reinit(he_uniform): changed") for line in conf["applied"])
    others = [t for t in rep["trials"] if t["label"] != rep["best"]["label"]]
    assert others and all(not t["error"] for t in others), "every remedy tried applied to the Keras model"


@pytest.mark.parametrize("name", ["regression", "regression_tf"])
def test_doctor_stops_a_keras_regressions_explosion(doctored: dict[str, Any], name: str) -> None:
    if name not in doctored:
        pytest.skip("Keras on TensorFlow is not installed")
    rep = doctored[name]
    conf = _check_fixed(rep, "nonfinite")
    base = rep["baseline"]
    assert "exploding_gradients" in base["problems"] and "exploding_gradients" not in conf["problems"]
    assert math.isnan(base["metric"]) and math.isfinite(conf["metric"]), "the printed loss went from nan to a number"
    assert rep["best"]["remedies"][0]["action"] in ("clip_norm", "clip_value")
    assert any(("global_clipnorm=1" in line or "clipvalue=5" in line) and "on keras SGD" in line for line in conf["applied"])
    tried = {t["remedies"][0]["action"] for t in rep["trials"]}
    assert not tried & {"skip_nonfinite", "rollback"}
    assert any(a.startswith("rollback(lr_factor=0.5) (nonfinite): Keras optimizers have no rollback") for a in rep["advice"])
    # The code change it cannot make names the script's line: the targets given to fit().
    assert any(a.startswith("scale_targets(") and "here: the targets `y[:500]` in `model.fit(...)` at " in a
               and a.endswith("unscaled_regression.py:16 (`y` set at line 12)") for a in rep["advice"]), rep["advice"]


def test_advice_that_needs_a_code_change_names_the_keras_line(doctored: dict[str, Any]) -> None:
    """A one-unit softmax under binary cross-entropy: nothing can be applied from outside, so no trial
    runs, and the advice names the `Dense(1, activation="softmax")` line of the script."""
    rep = doctored["softmax_bce"]
    assert rep["baseline"]["framework"] == "keras" and rep["baseline"]["problems"] and not rep["trials"]
    script = SCRIPTS / "../keras_programs/softmax_one_unit_bce.py"
    line = f'here: the `layers.Dense(1, activation="softmax")` output at {script}:22'
    assert any(a.startswith("change_output(activation=sigmoid, units=1)") and a.endswith(line) for a in rep["advice"]), \
        rep["advice"]


# ---------------------------------------------------------------------------------- unit tests


def test_clip_remedies_set_keras_clipping_and_leave_nothing_behind() -> None:
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    init = BaseOptimizer.__dict__["__init__"]
    w = keras.Variable(np.zeros(3, "float32"))
    with Treatment([{"action": "clip_value", "args": {"value": 5.0}}]) as t:
        opt = keras.optimizers.SGD(learning_rate=1.0, global_clipnorm=2.0)
        assert opt.clipvalue == 5.0 and opt.global_clipnorm is None and opt.clipnorm is None
        opt.apply([torch.tensor([100.0, -100.0, 1.0])], [w])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(w), [-5.0, 5.0, -1.0])  # Keras clipped each value to 5
    assert t.log == ["clip_value(value=5.0) on keras SGD at its construction: clipvalue=5 (replacing its "
                     "global_clipnorm=2.0)"]
    with Treatment([{"action": "clip_norm", "args": {"max_norm": 1.0}}]) as t:
        opt = keras.optimizers.Adam(clipnorm=3.0)
        assert opt.global_clipnorm == 1.0 and opt.clipnorm is None
    assert BaseOptimizer.__dict__["__init__"] is init and t.guards and all(g.from_treatment for g in t.guards)
    plain = keras.optimizers.SGD(learning_rate=0.1)
    assert plain.global_clipnorm is None and plain.clipvalue is None, "nothing leaks past the treatment"


def test_scale_lr_scales_a_float_lr_and_a_schedule_and_weight_decay_is_set() -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    with Treatment([{"action": "scale_lr", "args": {"factor": 0.1}}, {"action": "weight_decay", "args": {"l2": 0.01}}]):
        fixed = keras.optimizers.SGD(learning_rate=0.5)
        scheduled = keras.optimizers.Adam(learning_rate=schedule)
    assert float(keras.ops.convert_to_numpy(fixed.learning_rate)) == pytest.approx(0.05)
    assert fixed.weight_decay == 0.01 and scheduled.weight_decay == 0.01
    assert float(keras.ops.convert_to_numpy(scheduled.learning_rate)) == pytest.approx(0.1)  # step 0: 1.0 x 0.1
    scheduled.iterations.assign(2)
    assert float(keras.ops.convert_to_numpy(scheduled.learning_rate)) == pytest.approx(0.025)  # 0.25 x 0.1


def test_set_optimizer_replaces_the_compile_optimizer_and_puts_the_classes_back() -> None:
    from keras.src.models.model import Model

    sgd, compile_ = keras.optimizers.SGD, Model.compile
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)], name="swapped")
    remedy = {"action": "set_optimizer", "args": {"name": "Adam", "lr": 0.008}}
    with Treatment([remedy]) as t:
        model.compile(optimizer="sgd", loss="mse")
        assert type(model.optimizer).__name__ == "Adam" and float(model.optimizer.learning_rate) == pytest.approx(0.008)
        model.compile(optimizer=keras.optimizers.RMSprop(0.1, clipnorm=1.0), loss="mse")  # made by a swapped class
        assert type(model.optimizer).__name__ == "Adam" and model.optimizer.clipnorm == 1.0
        loop = keras.optimizers.SGD(learning_rate=0.5, momentum=0.9)
        assert type(loop).__name__ == "Adam" and float(loop.learning_rate) == pytest.approx(0.008)
    assert keras.optimizers.SGD is sgd and Model.compile is compile_ and "compile" not in Model.__dict__
    assert t.log == ["model.compile(optimizer='sgd') -> Adam(learning_rate=0.008)",
                     "keras RMSprop(...) -> Adam(learning_rate=0.008) (kept clipnorm=1.0)",
                     "keras SGD(...) -> Adam(learning_rate=0.008)"]


def test_skip_nonfinite_and_rollback_are_advice_on_a_keras_run() -> None:
    remedies = [Remedy("skip_nonfinite"), Remedy("rollback", {"lr_factor": 0.5}), Remedy("clip_norm", {"max_norm": 1.0})]
    findings = [Finding("nonfinite", "error", 8, 47, ["w"], "NaN", remedies=remedies)]
    tries, advice = candidates(findings, 6, "keras")
    assert [r["action"] for r in tries] == ["clip_norm"]
    assert [a.split(":")[0] for a in advice] == ["skip_nonfinite() (nonfinite)", "rollback(lr_factor=0.5) (nonfinite)"]
    assert all("Keras optimizers have no" in a for a in advice)
    tries, advice = candidates(findings, 6, "torch")
    assert [r["action"] for r in tries] == ["skip_nonfinite", "rollback", "clip_norm"] and not advice


BOTH = """
import os
os.environ["KERAS_BACKEND"] = "torch"
import keras, torch
km = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, activation="sigmoid"), keras.layers.Dense(1)], name="km")
km(torch.ones(3, 2))
tm = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 1))
opt = torch.optim.SGD(tm.parameters(), lr=0.1)
tm(torch.ones(3, 2)).sum().backward(); opt.step()
print("kinds", [type(m).__name__ for m in tm], km.layers[0].activation.__name__)
"""


def test_the_torch_surgery_hook_leaves_keras_layers_to_the_keras_part(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "both.py"
    script.write_text(BOTH)
    t = Treatment([{"action": "swap_activation", "args": {"from": "Sigmoid", "to": "ReLU"}}])
    code, _ = run_script(str(script), out=tmp_path / "r", treatment=t, quiet=True, report=False)
    assert code == 0
    assert "kinds ['Linear', 'ReLU', 'Linear'] relu" in capsys.readouterr().out  # each model changed by its own side
    assert sum(line.startswith("swap_activations(Sigmoid -> ReLU): changed 1") for line in t.log) == 2, t.log


CUSTOM_LOOP = """
import os
os.environ["KERAS_BACKEND"] = "torch"
import keras, torch
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.layers.Dense(8, activation="sigmoid"), keras.layers.Dense(8, activation="sigmoid"),
                          keras.layers.Dense(1, activation="sigmoid")], name="loop")  # no Input: built by its first call
opt = keras.optimizers.SGD(learning_rate=0.1)
x, y = torch.randn(64, 2), (torch.rand(64, 1) > 0.5).float()
for _ in range(5):
    loss = keras.losses.binary_crossentropy(y, model(x, training=True)).mean()
    model.zero_grad()
    loss.backward()
    opt.apply_gradients(zip([v.value.grad for v in model.trainable_variables], model.trainable_variables))
print("loop", type(opt).__name__, [layer.activation.__name__ for layer in model.layers])
"""


def test_a_custom_loops_model_and_optimizer_are_treated(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "loop.py"
    script.write_text(CUSTOM_LOOP)
    t = Treatment([{"action": "swap_activation", "args": {"from": "Sigmoid", "to": "ReLU", "init": "he_uniform"}},
                   {"action": "set_optimizer", "args": {"name": "RMSprop", "lr": 0.01}}])
    code, w = run_script(str(script), out=tmp_path / "r", treatment=t, quiet=True, report=False)
    assert code == 0
    assert "loop RMSprop ['relu', 'relu', 'sigmoid']" in capsys.readouterr().out
    assert t.log[0] == "keras SGD(...) -> RMSprop(learning_rate=0.01)" and t.log[1].startswith("swap_activations")
    run = gw.load_run(tmp_path / "r")
    assert run.streams[0]["optimizer"] == "keras.RMSprop" and len(run.steps) == 5


KERAS_FIT = """
import os
os.environ["KERAS_BACKEND"] = "torch"
import keras, numpy as np
keras.utils.set_random_seed(0)
x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32"); y = 100 * x[:, :1]
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)], name="fit")
model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
model.fit(x, y, batch_size=16, epochs=2, verbose=0)
"""
TORCH_LOOP = """
import torch
m = torch.nn.Linear(4, 1); o = torch.optim.SGD(m.parameters(), lr=0.01)
for _ in range(4):
    o.zero_grad(); (100 * m(torch.randn(16, 4))).pow(2).mean().backward(); o.step()
"""


def test_a_clip_treatment_clips_keras_with_its_own_option_and_torch_with_a_guard(tmp_path: Path) -> None:
    clip = [{"action": "clip_norm", "args": {"max_norm": 1.0}}]
    for name, text in (("keras_fit", KERAS_FIT), ("torch_loop", TORCH_LOOP)):
        (tmp_path / f"{name}.py").write_text(text)
        code, _ = run_script(str(tmp_path / f"{name}.py"), out=tmp_path / name, treatment=Treatment(clip), quiet=True,
                             report=False)
        assert code == 0, name
    keras_run, torch_run = gw.load_run(tmp_path / "keras_fit"), gw.load_run(tmp_path / "torch_loop")
    stream = keras_run.streams[0]
    assert stream["defaults"]["global_clipnorm"] == 1.0 and not stream.get("guards"), stream
    assert (keras_run.step_series("grad_norm") > 1).all()
    np.testing.assert_allclose(keras_run.step_series("grad_norm_clipped"), 1.0, rtol=1e-4)  # Keras clipped, once
    assert torch_run.streams[0]["guards"] and (torch_run.step_series("grad_norm_clipped") <= 1.0 + 1e-4).all()


SUBCLASSED = """
import os
os.environ["KERAS_BACKEND"] = "torch"
import keras, numpy as np
keras.utils.set_random_seed(0)

class Net(keras.Model):
    def __init__(self):
        super().__init__(name="net")
        self.a = keras.layers.Dense(8, activation="sigmoid")
        self.out = keras.layers.Dense(1, activation="sigmoid")

    def call(self, x):
        return self.out(self.a(x))

x = np.random.default_rng(0).normal(size=(64, 2)).astype("float32"); y = (x[:, :1] > 0).astype("float32")
model = Net()
model.compile(optimizer="sgd", loss="binary_crossentropy")  # not built yet: no Input, never called
model.fit(x, y, batch_size=16, epochs=1, verbose=0)
print("acts", model.a.activation.__name__, model.out.activation.__name__)
"""


def test_a_subclassed_model_compiled_before_it_is_built_is_operated_on_at_fit(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "sub.py"
    script.write_text(SUBCLASSED)
    t = Treatment([{"action": "reinit", "args": {"scheme": "he_uniform"}},
                   {"action": "swap_activation", "args": {"from": "Sigmoid", "to": "ReLU"}}])
    code, _ = run_script(str(script), out=tmp_path / "r", treatment=t, quiet=True, report=False)
    assert code == 0 and "acts relu sigmoid" in capsys.readouterr().out
    assert [line.split(":")[0] for line in t.log] == ["reinit(he_uniform)", "swap_activations(Sigmoid -> ReLU)"], t.log
    assert "changed 2" in t.log[0], "both Dense layers were built (by a call on fit's first sample) and drawn anew"
    assert len(gw.load_run(tmp_path / "r").steps) == 4


def test_a_bad_remedy_is_one_sentence() -> None:
    with pytest.raises(gw.GradwatchError, match="set_optimizer knows Adam, AdamW, SGD, RMSprop, Adagrad; got 'Lamb'"):
        Treatment([{"action": "set_optimizer", "args": {"name": "Lamb"}}])


def test_seeded_runs_of_a_tensorflow_script_are_the_same_run(tmp_path: Path) -> None:
    """doctor compares trials from one seed: `gradwatch run --seed` seeds TensorFlow's global seed too
    when the script imports it, or fit()'s shuffle (tf.data) differs from run to run."""
    if backend_error("tensorflow") is not None:
        pytest.skip("Keras on TensorFlow is not installed")
    script = tmp_path / "fit.py"
    script.write_text("import keras, numpy as np\n"
                      "x = np.random.normal(size=(256, 4)).astype('float32'); y = (x[:, :1] > 0).astype('float32')\n"
                      "L = keras.layers\n"
                      "m = keras.Sequential([keras.Input((4,)), L.Dense(8, activation='tanh'), L.Dense(1)])\n"
                      "m.compile('sgd', 'mse')\n"
                      "m.fit(x, y, batch_size=16, epochs=2, shuffle=True, verbose=0)\n")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "GRADWATCH_REPORT": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen([sys.executable, "-m", "gradwatch", "run", "--seed", "3", "--no-report", "--out",
                               str(tmp_path / f"run{i}"), str(script)], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:] if p.stderr else ""
    a, b = gw.load_run(tmp_path / "run0"), gw.load_run(tmp_path / "run1")
    assert len(a.steps) == 32
    np.testing.assert_array_equal(a.step_series("loss"), b.step_series("loss"))
