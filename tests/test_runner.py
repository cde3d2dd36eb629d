"""`gradwatch run SCRIPT`: the script behaves as under plain python, and every optimizer is recorded.

Each test writes a small training script into tmp_path and runs it in a subprocess, once with
``python script.py`` and once with ``python -m gradwatch run``, from ``cwd=tmp_path`` with the
script path given the same way, so the two runs can be compared line for line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import gradwatch
from gradwatch import runner

TIMEOUT = 120  # a bound on a hung child, never reached by a passing run

# A GAN in miniature: a generator G (Adam) and a discriminator D (SGD), both nn.Sequential, so both
# have a layer "0.weight". Each iteration steps D, then G. It prints what it saw and every loss
# (repr: the exact float32 value), and exits with code 3.
GAN_SCRIPT = """\
import argparse
import sys

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, required=True)
parser.add_argument("--save", default=None)
args = parser.parse_args()

print("__name__", __name__)
print("argv", repr(sys.argv))

torch.manual_seed(0)
G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
G0 = {k: v.clone() for k, v in G.state_dict().items()}
opt_G = torch.optim.Adam(G.parameters(), lr=1e-3)
opt_D = torch.optim.SGD(D.parameters(), lr=0.05, momentum=0.5)
bce = nn.BCEWithLogitsLoss()
real = torch.randn(64, 2) * 0.5 + 2.0
ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)

iterations = 0
for epoch in range(args.epochs):
    for b in range(4):
        x = real[b * 16:(b + 1) * 16]
        fake = G(torch.randn(16, 4))
        d_loss = bce(D(x), ones) + bce(D(fake.detach()), zeros)
        opt_D.zero_grad()
        d_loss.backward()
        opt_D.step()
        g_loss = bce(D(fake), ones)
        opt_G.zero_grad()
        g_loss.backward()
        opt_G.step()
        iterations += 1
        print("iter", iterations, "d_loss", repr(d_loss.item()), "g_loss", repr(g_loss.item()))
print("iterations", iterations)
if args.save:
    torch.save({"G": G.state_dict(), "D": D.state_dict(), "G0": G0}, args.save)
sys.exit(3)
"""

# One model, one optimizer, N steps; the body of SCRIPT_TAIL decides how the script ends.
TINY_TRAIN = """\
import sys

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 4), torch.randn(32, 1)


def train(n):
    for i in range(n):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def python(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def gradwatch_run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return python("-m", "gradwatch", "run", *args, cwd=cwd, env=env)


def line_of(path: Path, needle: str) -> int:
    """1-based number of the line of ``path`` that contains ``needle``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


# ------------------------------------------------------------------------------ the GAN script


@pytest.fixture(scope="module")
def gan(tmp_path_factory):
    """The GAN script run with plain python and with gradwatch run, from the same directory."""
    d = tmp_path_factory.mktemp("gan")
    write(d / "script.py", GAN_SCRIPT)
    plain = python("script.py", "--epochs", "3", cwd=d)
    watched = gradwatch_run("--out", str(d / "run"), "script.py", "--epochs", "3", cwd=d)
    return d, plain, watched


def test_gan_script_sees_what_python_gives_it(gan):
    d, plain, watched = gan
    assert plain.returncode == 3, plain.stderr
    assert watched.returncode == plain.returncode, watched.stderr
    # gradwatch writes only to stderr; the script's output (its losses included) is untouched.
    assert watched.stdout == plain.stdout
    lines = watched.stdout.splitlines()
    assert lines[0] == "__name__ __main__"
    assert lines[1] == "argv ['script.py', '--epochs', '3']"
    assert "Traceback" not in watched.stderr


def test_gan_run_directory_holds_both_models(gan):
    d, plain, watched = gan
    run = gradwatch.load_run(d / "run")
    assert run.status == "exited"  # sys.exit(3)

    assert len(run.streams) == 2
    by_label = {s["label"]: s for s in run.streams}
    assert set(by_label) == {"G", "D"}
    assert by_label["G"]["optimizer"] == "Adam"
    assert by_label["D"]["optimizer"] == "SGD"

    # Both Sequentials have 0.weight: the names carry the model's variable name as a prefix.
    expected = {f"{m}/{i}.{p}" for m in "GD" for i in (0, 2) for p in ("weight", "bias")}
    assert {layer.name for layer in run.layers} == expected
    for s in run.streams:
        assert {run.layers[i].name.split("/")[0] for i in s["layers"]} == {s["label"]}

    iterations = int(watched.stdout.splitlines()[-1].split()[-1])
    assert iterations == 3 * 4
    assert len(run.steps) == iterations
    np.testing.assert_array_equal(run.steps, np.arange(iterations))
    grad_rms = run.layer_series("grad_rms")
    assert np.isfinite(grad_rms).all()  # every layer of both models, every step
    assert (grad_rms > 0).all()


def test_gan_loss_is_the_tensor_backward_was_called_on(gan):
    d, plain, watched = gan
    run = gradwatch.load_run(d / "run")
    # D steps first in every iteration, so D is the first stream and the step's loss is D's.
    assert run.streams[0]["label"] == "D"
    printed = [line.split() for line in watched.stdout.splitlines() if line.startswith("iter ")]
    d_losses = np.array([float(p[3]) for p in printed], dtype=np.float32)
    loss = run.step_series("loss")
    assert np.isfinite(loss).all()
    np.testing.assert_array_equal(loss, d_losses)


def test_training_is_bit_identical_with_and_without_gradwatch(tmp_path):
    write(tmp_path / "script.py", GAN_SCRIPT)
    plain = python("script.py", "--epochs", "3", "--save", "plain.pt", cwd=tmp_path)
    watched = gradwatch_run("--out", str(tmp_path / "run"), "script.py", "--epochs", "3", "--save", "watched.pt", cwd=tmp_path)
    assert plain.returncode == watched.returncode == 3, (plain.stderr, watched.stderr)
    a = torch.load(tmp_path / "plain.pt")
    b = torch.load(tmp_path / "watched.pt")
    assert not torch.equal(a["G"]["0.weight"], a["G0"]["0.weight"])  # training moved the weights
    for model in ("G", "D"):
        assert a[model].keys() == b[model].keys()
        for name in a[model]:
            assert torch.equal(a[model][name], b[model][name]), f"{model}.{name} differs under gradwatch"


# ------------------------------------------------------------------------ how the script ends


def test_script_exception_is_reported_as_python_would(tmp_path):
    script = write(
        tmp_path / "script.py",
        TINY_TRAIN
        + """\


def main():
    train(7)
    raise RuntimeError("boom after 7 steps")


main()
""",
    )
    res = gradwatch_run("--out", str(tmp_path / "run"), "script.py", cwd=tmp_path)
    assert res.returncode == 1

    err = res.stderr.splitlines()
    start = err.index("Traceback (most recent call last):")
    end = next(i for i in range(start, len(err)) if err[i].startswith("RuntimeError"))
    assert err[end] == "RuntimeError: boom after 7 steps"
    frames = [line.strip() for line in err[start + 1 : end] if line.strip().startswith("File ")]
    # The traceback starts in the script (as under python), not in runpy or gradwatch's runner.
    assert len(frames) == 2, err[start:end]
    last_line = len(script.read_text().splitlines())  # the module-level main() call
    assert "script.py" in frames[0] and f"line {last_line}, in <module>" in frames[0]
    assert "script.py" in frames[1] and f"line {line_of(script, 'raise RuntimeError')}, in main" in frames[1]
    assert not any("runpy" in f or "gradwatch" in f for f in frames)

    run = gradwatch.load_run(tmp_path / "run")
    assert run.status == "crashed"
    np.testing.assert_array_equal(run.steps, np.arange(7))
    assert np.isfinite(run.layer_series("grad_norm")).all()


def test_sys_exit_with_a_message_exits_1_and_prints_it(tmp_path):
    write(tmp_path / "script.py", TINY_TRAIN + '\ntrain(3)\nsys.exit("data exhausted, stopping early")\n')
    res = gradwatch_run("--out", str(tmp_path / "run"), "script.py", cwd=tmp_path)
    assert res.returncode == 1
    assert "data exhausted, stopping early" in res.stderr.splitlines()
    assert res.stdout == ""
    run = gradwatch.load_run(tmp_path / "run")
    assert len(run.steps) == 3
    assert run.status != "finished"


def test_script_without_an_optimizer_step_records_nothing_and_says_so(tmp_path):
    write(
        tmp_path / "script.py",
        TINY_TRAIN
        + """
loss = nn.functional.mse_loss(model(x), y)
loss.backward()  # gradients, but no opt.step()
print("done")
""",
    )
    res = gradwatch_run("--out", str(tmp_path / "run"), "script.py", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "done\n"
    note = res.stderr.strip().splitlines()
    assert len(note) == 1, res.stderr
    assert note[0].startswith("gradwatch:") and "nothing was recorded" in note[0]
    assert not (tmp_path / "run").exists()  # no half-made run directory left behind


def test_module_mode_runs_a_package_module_with_relative_imports(tmp_path):
    root = tmp_path / "code"
    write(root / "pkg" / "__init__.py", "")
    write(
        root / "pkg" / "model.py",
        """\
        from torch import nn


        def build():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        """,
    )
    write(
        root / "pkg" / "train.py",
        """\
        import sys

        import torch
        from torch import nn

        from .model import build

        print("__name__", __name__, "__package__", __package__)
        print("argv[1:]", sys.argv[1:])
        torch.manual_seed(0)
        net = build()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        for _ in range(int(sys.argv[sys.argv.index("--steps") + 1])):
            loss = nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print("loss", repr(loss.item()))
        """,
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    plain = python("-m", "pkg.train", "--steps", "5", cwd=tmp_path, env=env)
    watched = gradwatch_run("--out", str(tmp_path / "run"), "-m", "pkg.train", "--steps", "5", cwd=tmp_path, env=env)
    assert plain.returncode == 0, plain.stderr
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout == plain.stdout
    assert watched.stdout.splitlines()[:2] == ["__name__ __main__ __package__ pkg", "argv[1:] ['--steps', '5']"]
    run = gradwatch.load_run(tmp_path / "run")
    assert run.status == "finished"
    assert len(run.steps) == 5
    assert [layer.name for layer in run.layers] == ["0.weight", "0.bias", "2.weight", "2.bias"]


# ------------------------------------------------------------------ nothing is left patched


@pytest.mark.parametrize("ending", ["normal", "exception"])
def test_run_script_restores_torch_afterwards(tmp_path, ending, capsys):
    from torch.optim import optimizer as optim_mod

    tail = "\ntrain(4)\n" + ('raise ValueError("script failed")\n' if ending == "exception" else "")
    script = write(tmp_path / "script.py", TINY_TRAIN + tail)
    before = (
        torch.Tensor.backward,
        torch.autograd.backward,
        list(optim_mod._global_optimizer_pre_hooks),
        list(optim_mod._global_optimizer_post_hooks),
    )
    argv, path = sys.argv[:], sys.path[:]

    code, w = runner.run_script(str(script), [], out=tmp_path / "run", quiet=True)

    assert code == (0 if ending == "normal" else 1)
    # The patches were live during the run: the loss came from backward(), every step was seen.
    run = gradwatch.load_run(tmp_path / "run")
    assert len(run.steps) == 4
    assert np.isfinite(run.step_series("loss")).all()
    # ... and are gone now.
    assert torch.Tensor.backward is before[0]
    assert torch.autograd.backward is before[1]
    assert list(optim_mod._global_optimizer_pre_hooks) == before[2]
    assert list(optim_mod._global_optimizer_post_hooks) == before[3]
    assert sys.argv == argv and sys.path == path
    # An optimizer made after the run steps without feeding the closed watch.
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    p.sum().backward()
    opt.step()
    assert len(gradwatch.load_run(tmp_path / "run").steps) == 4
    capsys.readouterr()


def test_a_sequential_with_its_activation_is_watched_not_its_linear_alone(tmp_path: Path) -> None:
    """Sequential(Linear, Sigmoid) owns exactly the Linear's parameters: the outer module is the
    model (its Sigmoid is seen), while DDP/compile wrappers still lose to what they wrap."""
    from gradwatch.runner import find_owner_module

    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    assert find_owner_module(list(model.parameters())) is model
