"""Forensics: the first non-finite step of a run, localised to its module, op and samples.

Each failing case has a known source, built into the model or the data; the tests assert the
stored evidence exactly, and where detect_anomaly alone names another place, what it names. The
healthy-run tests check that forensics costs no host read and changes nothing.
"""

from __future__ import annotations

import copy
import json
import re
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from models import make
from test_probe import SyncCounter
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch import runner
from gradwatch.errors import GradwatchError
from gradwatch.guards import SkipNonFinite

Batch = tuple[torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------------ models


class LogFeatures(nn.Module):
    """log of a projection that starts as the identity: negative wherever an input feature is."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(4))
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.proj(x))


class LogNet(nn.Module):
    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Identity(), LogFeatures(), nn.Linear(4, 16), nn.Tanh())
        self.bn = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.encoder(x)))


class Normalize(nn.Module):
    """x / ‖x‖: finite forward at x = 0 (the eps), but sqrt's derivative there is 0/0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-6)


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8, bias=False)
        self.norm = Normalize()
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


class Attention(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1) @ self.v(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp = Attention(), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


class Gate(nn.Module):
    """log of a dropout mask: -inf exactly in the rows the mask dropped (random: needs the RNG state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = F.dropout(torch.ones_like(x[:, :1]), p=0.3, training=self.training)
        return x * torch.log(keep + 0.0)


def mlp4() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))


def positive_batches(n: int, batch: int = 24, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 4, generator=g) + 1.0, torch.randn(batch, 1, generator=g)) for _ in range(n)]


# ------------------------------------------------------------------------------------ running


def train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch], *, accumulate: int = 1,
          autocast: torch.dtype | None = None, log: Callable[[torch.Tensor], None] | None = None) -> None:
    for x, y in batches:
        opt.zero_grad()
        total = torch.zeros(())
        for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate)):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                out = model(xs)
            loss = F.mse_loss(out.float(), ys) / accumulate
            loss.backward()
            total += loss.detach()
        opt.step()
        if log is not None:
            log(total)


def watched(model: nn.Module, batches: list[Batch], out: Path, *, late: bool = False, guards: list | None = None,
            lr: float = 0.01, **kw: Any) -> tuple[gw.Watch, dict[str, Any]]:
    """Train under a watch; the nonfinite finding's evidence (empty without one)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=kw.pop("momentum", 0.0))
    w = gw.watch(model, opt, out=out, quiet=True, guards=guards, **{k: v for k, v in kw.items() if k == "forensics"})
    if late:
        w.stream(opt).forensics.late = True  # learn of a step one step late, as on a GPU
    train(model, opt, batches, log=w.log, **{k: v for k, v in kw.items() if k in ("accumulate", "autocast")})
    w.close()
    found = [f for f in w.findings if f.kind == "nonfinite"]
    return w, (found[0].to_json() if found else {})


def anomaly_says(build: Callable[[], nn.Module], batches: list[Batch], lr: float = 0.01, momentum: float = 0.0,
                 autocast: torch.dtype | None = None) -> str | None:
    """What torch.autograd.detect_anomaly alone names: the same training, unwatched, the failing
    step's backward under anomaly mode (the node in its error message)."""
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode's "this will increase the runtime"
        for x, y in batches:
            opt.zero_grad()
            with torch.autograd.detect_anomaly(check_nan=True):
                with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                    out = model(x)
                try:
                    F.mse_loss(out.float(), y).backward()
                except RuntimeError as e:
                    return re.search(r"Function '(\w+)'", str(e)).group(1)  # type: ignore[union-attr]
            opt.step()
    return None


def seeded(cls: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return cls()
    return build


# ------------------------------------------------------------------------------------ known sources


def test_nan_in_one_input_row(tmp_path: Path) -> None:
    batches = positive_batches(5)
    batches[3][0][5, 2] = float("nan")
    build = seeded(mlp4)
    _, f = watched(build(), batches, tmp_path / "r")
    e = f["evidence"]
    assert (e["origin"], e["module"], e["samples"], e["op"], e["replayed"]) == ("forward", "input", [5], None, True)
    assert e["replay_note"] is None and f["first_step"] == 3
    assert f["summary"] == "nonfinite at step 3: the batch itself held NaN, in sample 5 of the batch."
    # detect_anomaly alone stops at the loss, the last place the NaN went through, not where it came in.
    assert anomaly_says(build, batches) == "MseLossBackward0"


def test_log_of_a_value_gone_negative_in_an_inner_module(tmp_path: Path) -> None:
    batches = positive_batches(5)
    batches[3][0][7, 0] = -0.5  # finite inputs; the projection inside encoder.1 goes negative there
    batches[3][0][19, 2] = -0.25
    build = seeded(LogNet)
    _, f = watched(build(), batches, tmp_path / "r")
    e = f["evidence"]
    assert (e["module"], e["samples"], e["replayed"], e["value"]) == ("encoder.1", [7, 19], True, "NaN")
    assert e["module_type"] == "LogFeatures"
    assert {k: e["op"][k] for k in ("phase", "name", "node", "module")} == {
        "phase": "forward", "name": "log", "node": "LogBackward0", "module": "encoder.1"}
    assert -0.5 < e["op"]["input_min"] < -0.45  # sample 7's -0.5 after three small updates of proj
    assert f["summary"] == ("nonfinite at step 3: NaN first produced by `encoder.1` (LogFeatures; its log input went "
                            f"down to {e['op']['input_min']:.3g}), in samples 7 and 19 of the batch.")
    assert anomaly_says(build, batches) == "MseLossBackward0"


def test_division_by_a_norm_that_reaches_zero_in_the_backward_only(tmp_path: Path) -> None:
    batches = positive_batches(4)
    batches[2][0][5] = 0.0  # body has no bias: norm's input is exactly 0 in sample 5
    build = seeded(NormNet)
    _, f = watched(build(), batches, tmp_path / "r")
    e = f["evidence"]
    assert e["origin"] == "backward" and f["first_step"] == 2
    assert (e["module"], e["samples"], e["replayed"]) == (None, [5], True)
    assert e["op"] == {"phase": "backward", "name": None, "node": "SqrtBackward0", "module": "norm"}
    assert "the first NaN gradient was made by SqrtBackward0 in the backward of `norm`" in f["summary"]
    # Here detect_anomaly names the same node, but neither its module nor the sample.
    assert anomaly_says(build, batches) == e["anomaly"] == "SqrtBackward0"


def test_attention_overflow_under_float16_autocast(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(24, 6, 16, generator=g), torch.randn(24, 1, generator=g)) for _ in range(5)]
    batches[3][0][7] *= 300  # q·k of these two samples passes float16's 65504
    batches[3][0][19] *= 300
    build = seeded(AttnNet)
    _, f = watched(build(), batches, tmp_path / "r", autocast=torch.float16)
    e = f["evidence"]
    assert (e["module"], e["samples"], f["first_step"]) == ("blocks.0.attn", [7, 19], 3)
    assert {k: e["op"][k] for k in ("phase", "name", "node", "module", "dtype", "value")} == {
        "phase": "forward", "name": "matmul", "node": "UnsafeViewBackward0", "module": "blocks.0.attn",
        "dtype": "float16", "value": "Inf"}
    assert f["summary"] == ("nonfinite at step 3: NaN first produced by `blocks.0.attn` (Attention; its matmul overflowed "
                            "float16), in samples 7 and 19 of the batch.")
    said = anomaly_says(build, batches, autocast=torch.float16)
    assert said is not None and said not in ("UnsafeViewBackward0", "BmmBackward0")  # somewhere downstream


def exploding_regression() -> tuple[Callable[[], nn.Module], list[Batch]]:
    """Seed 001's setup: raw make_regression targets, SGD with momentum: the weights grow until a
    gradient overflows float32."""
    from sklearn.datasets import make_regression

    X, y = make_regression(n_samples=256, n_features=20, noise=0.1, random_state=1)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None]
    batches = [(X[i % 8 * 32:(i % 8 + 1) * 32], y[i % 8 * 32:(i % 8 + 1) * 32]) for i in range(10)]
    return seeded(lambda: nn.Sequential(nn.Linear(20, 25), nn.ReLU(), nn.Linear(25, 25), nn.ReLU(),
                                        nn.Linear(25, 1))), batches


def test_nan_after_an_explosion_points_at_the_weights_and_where_the_overflow_began(tmp_path: Path) -> None:
    build, batches = exploding_regression()
    _, f = watched(build(), batches, tmp_path / "r", momentum=0.9)
    e = f["evidence"]
    assert e["origin"] == "weights" and f["first_step"] == 6  # the norm overflowed, every gradient finite
    assert (e["forensics_step"], e["norm_overflow_step"], e["module"], e["value"]) == (7, 6, None, "Inf")
    assert e["op"] == {"phase": "backward", "name": None, "node": "AddmmBackward0", "module": "4"}
    # The reference, by hand: step 7's pre-step weights; the gradient reaching layer 4's output is
    # finite, the one it passes to its input is not — in exactly the samples forensics names.
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train(model, opt, batches[:7])
    x, y = batches[7]
    h = model[:4](x)
    out = model[4](h)
    g_out, g_h = torch.autograd.grad(F.mse_loss(out, y), [out, h])
    assert torch.isfinite(g_out).all() and not torch.isfinite(g_h).all()
    assert e["samples"] == (~torch.isfinite(g_h)).any(1).nonzero().flatten().tolist()
    assert f["summary"].endswith("in all 32 samples of the batch; the weights had already grown out of range (the "
                                 "gradient norm exploded before it).")


def test_dropout_is_replayed_with_the_steps_random_state(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), Gate(), nn.Linear(8, 1))
    dropped: list[list[int]] = []
    model[1].register_forward_hook(lambda m, i, o: dropped.append((~torch.isfinite(o)).any(1).nonzero().flatten().tolist()))
    _, f = watched(model, positive_batches(2), tmp_path / "r")
    assert len(dropped) == 2  # the training forwards only: the replay does not run the model's own hooks
    e = f["evidence"]
    assert e["module"] == "1" and e["samples"] == dropped[0] and 0 < len(dropped[0]) < 24
    assert e["op"]["name"] == "log" and e["op"]["value"] == "Inf"


def test_gradient_accumulation_names_the_micro_batch(tmp_path: Path) -> None:
    batches = positive_batches(4)
    batches[2][0][12 + 3, 1] = float("inf")  # second micro-batch of two, its row 3
    _, f = watched(seeded(mlp4)(), batches, tmp_path / "r", accumulate=2)
    e = f["evidence"]
    assert (e["module"], e["samples"], e["forward"], e["forwards"], e["value"]) == ("input", [3], 1, 2, "Inf")


def test_a_compiled_model_is_kept_outside_its_graph_and_replayed_eagerly(tmp_path: Path) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    batches = positive_batches(5)
    batches[3][0][7, 0] = -0.5
    model = seeded(LogNet)()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(compiled, opt, out=tmp_path / "r", quiet=True) as w:
        train(compiled, opt, batches, log=w.log)
    e = next(f for f in w.findings if f.kind == "nonfinite").evidence
    assert (e["module"], e["samples"], e["replayed"]) == ("encoder.1", [7], True)
    assert not counters["graph_break"]


# ------------------------------------------------------------------------------------ on a GPU: a step late


def test_learning_a_step_late_without_a_guard_checks_the_batch_only(tmp_path: Path) -> None:
    batches = positive_batches(5)
    batches[3][0][5, 2] = float("nan")
    _, f = watched(seeded(mlp4)(), batches, tmp_path / "a", late=True)
    e = f["evidence"]
    assert (e["module"], e["samples"], e["replayed"]) == ("input", [5], False)
    assert "had already been applied when gradwatch learned of it" in e["replay_note"]
    batches = positive_batches(5)
    batches[3][0][7, 0] = -0.5
    _, f = watched(seeded(LogNet)(), batches, tmp_path / "b", late=True)
    e = f["evidence"]
    assert (e["module"], e["op"], e["replayed"]) == (None, None, False)
    assert e["replay_note"].startswith("the update of step 3 had already been applied")
    assert "gradwatch could not" not in f["summary"] and "where it came from is unknown: the update" in f["summary"]


def test_learning_a_step_late_with_skip_nonfinite_replays_the_kept_weights(tmp_path: Path) -> None:
    batches = positive_batches(6)
    batches[3][0][7, 0] = -0.5
    batches[3][0][19, 2] = -0.25
    _, f = watched(seeded(LogNet)(), batches, tmp_path / "r", late=True, guards=[SkipNonFinite()])
    e = f["evidence"]
    assert (e["module"], e["samples"], e["replayed"], e["op"]["name"]) == ("encoder.1", [7, 19], True, "log")


# ------------------------------------------------------------------------------------ changes nothing


@pytest.mark.parametrize("arch", ["mlp", "cnn", "transformer", "dropout"])
def test_a_healthy_run_is_bit_identical_with_forensics(arch: str, tmp_path: Path) -> None:
    def build() -> nn.Module:
        if arch == "dropout":
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 3))
        return make(arch)

    finals = []
    for on in (True, False):
        model = build()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        with gw.watch(model, opt, out=tmp_path / str(on), quiet=True, forensics=on, sample_every=2) as w:
            from models import train as train_arch
            train_arch(model, opt, 6)
            assert (w.stream(opt).forensics is not None) is on
        finals.append(copy.deepcopy(model.state_dict()))
        assert not w.findings or all(f.kind != "nonfinite" for f in w.findings)
    assert all(torch.equal(a, finals[1][k]) for k, a in finals[0].items())


def test_a_failing_run_trains_the_same_with_forensics(tmp_path: Path) -> None:
    """The replay leaves weights, gradients, BatchNorm statistics and the random state as it found them."""
    batches = positive_batches(6)
    batches[3][0][7, 0] = -0.5
    finals, rng = [], []
    for on in (True, False):
        model = seeded(lambda: LogNet(norm=True))()
        watched(model, batches, tmp_path / str(on), forensics=on)
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
        rng.append(torch.rand(3))
    for k, a in finals[0].items():
        assert torch.equal(a.isnan(), finals[1][k].isnan()) and torch.equal(a.nan_to_num(), finals[1][k].nan_to_num()), k
    assert torch.equal(rng[0], rng[1])


def test_healthy_steps_make_no_host_read_and_keep_one_step(tmp_path: Path) -> None:
    model = make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gw.watch(model, opt, out=tmp_path / "r", flush_every=4, sample_every=2, quiet=True)
    fx = w.stream(opt).forensics
    counter = SyncCounter(w.stream(opt).probe._staging)
    kept: list[int] = []
    opt.register_step_post_hook(lambda *a: kept.append(len(fx.forwards) + len(fx.pending)))
    with counter:
        from models import train as train_arch
        train_arch(model, opt, 10, on_step=lambda loss: w.log(loss=loss))
    assert counter.syncs == [] and counter.transfers == 2  # as without forensics: the two flushes
    assert kept == [0] * 10 and not fx.done  # each healthy step's references dropped at its step
    assert len(model._forward_pre_hooks) == 1  # forensics' one hook, taken off at close
    w.close()
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_a_model_that_returns_its_loss_is_replayed_from_the_loss_alone() -> None:
    """Hugging Face models return (loss, logits); the logits' gradient came through the loss, so the
    replayed backward starts from the loss only (else that gradient would be counted twice)."""
    from gradwatch.forensics_replay import _outermost

    x = torch.randn(4, 3, requires_grad=True)
    logits = x * 2
    loss = logits.sum()
    pairs = [(loss, torch.ones(())), (logits, torch.ones(4, 3))]
    assert [o is loss for o, _ in _outermost(pairs)] == [True]
    assert len(_outermost([(x * 3, torch.ones(4, 3)), (x * 4, torch.ones(4, 3))])) == 2  # independent outputs


def test_every_host_read_in_the_per_step_module_is_marked() -> None:
    """The counter above cannot see numpy reads of CPU tensors: read forensics.py's source as
    tests/test_probe.py reads the probe's (forensics_replay.py runs at the bad step only)."""
    src = (Path(gw.__file__).parent / "forensics.py").read_text().splitlines()
    pattern = re.compile(r"\.item\(\)|\.tolist\(\)|\.cpu\(\)|\.numpy\(\)|(?<![\w.])float\(|(?<![\w.])bool\(")
    assert [line for line in src if pattern.search(line) and "# sync-ok" not in line] == []


# ------------------------------------------------------------------------------------ the contract


def test_findings_json_and_meta_hold_the_evidence(tmp_path: Path) -> None:
    batches = positive_batches(5)
    batches[3][0][5, 2] = float("nan")
    w, _ = watched(seeded(mlp4)(), batches, tmp_path / "r")
    stored = json.loads((tmp_path / "r" / "findings.json").read_text())["findings"]
    e = next(f for f in stored if f["kind"] == "nonfinite")["evidence"]
    assert {"origin", "module", "samples", "op", "replayed", "replay_note"} <= set(e)
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["options"]["forensics"] is True
    assert meta["streams"][0]["forensics"]["step"] == 3
    assert gw.diagnose(tmp_path / "r")[0].evidence["samples"] == [5]  # from the stored run alone


def test_forensics_off(tmp_path: Path) -> None:
    batches = positive_batches(5)
    batches[3][0][5, 2] = float("nan")
    model = seeded(mlp4)()
    w, f = watched(model, batches, tmp_path / "r", forensics=False)
    assert f["evidence"]["origin"] == "forward" and "module" not in f["evidence"] and "replayed" not in f["evidence"]
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["options"]["forensics"] is False
    with pytest.raises(GradwatchError, match="forensics must be True or False; got 'yes'"):
        gw.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), out=tmp_path / "x", forensics="yes")


def test_gradwatch_run_localises_an_unmodified_script(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(6):
            x, y = torch.rand(24, 4) + 1.0, torch.randn(24, 1)
            if step == 3:
                x[11, 0] = float("nan")
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    """))
    code, w = runner.run_script(str(script), [], out=tmp_path / "run", quiet=True)
    assert code == 0
    e = next(f for f in w.findings if f.kind == "nonfinite").evidence
    assert (e["module"], e["samples"], e["replayed"]) == ("input", [11], True)

    from gradwatch import cli  # the command line's switch: off, and on again

    assert cli.main(["run", "--no-forensics", "--no-report", "--out", str(tmp_path / "off"), str(script)]) == 0
    assert json.loads((tmp_path / "off" / "meta.json").read_text())["options"]["forensics"] is False
    assert "module" not in next(f for f in gw.load_run(tmp_path / "off").findings if f.kind == "nonfinite").evidence
    assert cli.main(["run", "--forensics", "--no-report", "--out", str(tmp_path / "on"), str(script)]) == 0
    assert next(f for f in gw.load_run(tmp_path / "on").findings if f.kind == "nonfinite").evidence["samples"] == [11]


DDP_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
import gradwatch as gw


def rank_main(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    with gw.watch(model, opt, out=f"{tmp}/run" if rank == 0 else f"{tmp}/run-rank1", quiet=True, flush_every=2) as w:
        for step in range(6):
            x, y = torch.rand(12, 4, generator=g) + 1.0, torch.randn(12, 1, generator=g)
            if step == 3 and rank == 1:
                x[2, 0] = float("nan")  # rank 1's batch only: the all-reduce spreads it to rank 0's gradients
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    dist.destroy_process_group()
    # The record is written. Leave without interpreter teardown: under load a still-joinable gloo
    # thread can abort the process there ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1],), nprocs=2)
"""


@pytest.mark.integration
def test_data_parallel_each_rank_localises_its_batch_and_rank_0_records_all(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    for attempt in range(2):  # a gloo abort at a rank's teardown (a signal, not an error of gradwatch's) is retried once
        for old in (tmp_path / "run", tmp_path / "run-rank1", tmp_path / "store"):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        res = subprocess.run([sys.executable, "ddp.py", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=180)
        if res.returncode == 0 or "terminate called without an active exception" not in res.stderr:
            break
    assert res.returncode == 0, res.stderr[-3000:]
    e = next(f for f in gw.load_run(tmp_path / "run").findings if f.kind == "nonfinite").evidence
    assert (e["module"], e["samples"], e["rank"]) == ("input", [2], 1)
    ranks = {r["rank"]: r for r in e["ranks"]}
    assert (ranks[1]["module"], ranks[1]["samples"]) == ("input", [2])
    assert ranks[0]["module"] is None and ranks[0]["replay_note"].startswith("the replay stayed finite")
    assert "on rank 1" in next(f for f in gw.load_run(tmp_path / "run").findings if f.kind == "nonfinite").summary


class TwoParts(nn.Module):
    """A model whose training step calls its parts, as a LightningModule's training_step calls self.net."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)


def _parts_run(tmp_path: Path, between: bool) -> dict:
    torch.manual_seed(0)
    model = TwoParts()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = positive_batches(8)
    batches[5][0][3, :] = -1e4 if between else float("nan")  # between: enc's tanh is exactly -1 in row 3
    with gw.watch(model, opt, out=tmp_path / "r", quiet=True, report=False) as w:
        for x, y in batches:
            h = model.enc(x)
            if between:
                h = torch.log(h + 1.0)  # the training step's own code: -inf where tanh reached -1
            loss = F.mse_loss(model.head(h), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    return next(f for f in gw.load_run(tmp_path / "r").findings if f.kind == "nonfinite").evidence


def test_a_training_step_that_calls_the_models_parts_is_localised_in_them(tmp_path: Path) -> None:
    e = _parts_run(tmp_path, between=False)
    assert (e["module"], e["samples"], e["replayed"]) == ("input", [3], True)  # enc's input: the batch
    e = _parts_run(tmp_path / "b", between=True)
    assert (e["module"], e["before"], e["samples"], e["value"]) == (None, "head", [3], "Inf")
    f = next(f for f in gw.load_run(tmp_path / "b" / "r").findings if f.kind == "nonfinite")
    assert "Inf was made by the training step's own code before `head`" in f.summary and "sample 3 " in f.summary


@pytest.mark.integration
def test_a_lightning_training_step_calling_its_net_is_localised(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.lightning import GradWatch

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

        def training_step(self, batch, i):  # type: ignore[no-untyped-def]
            x, y = batch
            return F.mse_loss(self.net(x), y)  # the net, not self(x): the LightningModule's forward never runs

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    x, y = torch.rand(64, 4) + 1.0, torch.randn(64, 1)
    x[45, 2] = float("nan")  # batch 5 (of 8), its row 5
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[GradWatch(out=tmp_path / "lit", quiet=True, report=False)])
    trainer.fit(Module(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
    e = next(f for f in gw.load_run(tmp_path / "lit").findings if f.kind == "nonfinite").evidence
    assert (e["module"], e["samples"], e["replayed"]) == ("input", [5], True)
