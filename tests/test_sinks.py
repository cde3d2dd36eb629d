"""Live sinks (``watch(..., log_to=[...])``): what TensorBoard, MLflow and W&B hold is read back from their
own files and stores and compared with the stored run; a sink that fails costs neither training nor the record."""

from __future__ import annotations

import errno
import glob
import json
import struct
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch as gw
from gradwatch.sinks import LayerChoice, Sink
from gradwatch.sinks_window import over_layers_tag
from gradwatch.store import LayerInfo

N_STEPS, FLUSH, SAMPLE = 40, 10, 5


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """Seed 000's sigmoid MLP, small: SGD barely moves it, so the run has findings to send."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(64, 16), torch.randn(64, 1)


def train(model, opt, x, y, w, steps: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.log(loss)


def watched(tmp: Path, log_to, **kw):  # type: ignore[no-untyped-def]
    model, opt, x, y = make()
    w = gw.watch(model, opt, out=tmp / "run", quiet=True, flush_every=FLUSH, sample_every=SAMPLE, log_to=log_to, **kw)
    return model, opt, x, y, w


def key_layers(run) -> list[int]:  # type: ignore[no-untyped-def]
    weights = [i for i, layer in enumerate(run.layers) if len(layer.shape) >= 2]
    return [weights[0], weights[-1]]


class Recording(Sink):
    """A user's own sink: keeps what it is given."""

    label = "recording"

    def __init__(self) -> None:
        super().__init__("all")
        self.windows: list = []
        self.sent: list = []
        self.end = None

    def write(self, window) -> None:  # type: ignore[no-untyped-def]
        self.windows.append(window)

    def findings(self, new, step) -> None:  # type: ignore[no-untyped-def]
        self.sent += [f.kind for f in new]

    def close(self, end) -> None:  # type: ignore[no-untyped-def]
        self.end = end


# ------------------------------------------------------------------------------------------ options


def test_bad_log_to_is_one_sentence(tmp_path: Path) -> None:
    model, opt, _, _ = make()
    cases = [
        (["tensorbord"], "unknown sink 'tensorbord' in log_to; known: tensorboard, wandb, mlflow "
                         "(or a gradwatch.sinks.Sink object)."),
        ({"wandb": {"projekt": "x"}},
         "unknown option 'projekt' for log_to 'wandb'; known: layers, project, entity, name, mode, run."),
        ("tensorboard,tensorboard", "log_to names 'tensorboard' twice; name each sink once."),
        (3, "log_to takes sink names (tensorboard, wandb, mlflow), a list of them or a dict of names to options; got int."),
        ({"tensorboard": {"layers": "some"}}, 'layers= takes "key", "all" or a list of layer names or prefixes; got \'some\'.'),
    ]
    for spec, message in cases:
        with pytest.raises(gw.GradwatchError) as info:
            gw.watch(model, opt, out=tmp_path / "run", log_to=spec)
        assert str(info.value) == message
    assert not (tmp_path / "run").exists()


def test_missing_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    model, opt, _, _ = make()
    with pytest.raises(gw.GradwatchError, match=r"^log_to 'mlflow' needs the mlflow package; install it with "
                                                r"`pip install gradwatch\[mlflow\]`\.$"):
        gw.watch(model, opt, out=tmp_path / "run", log_to="mlflow")


def test_layer_choice() -> None:
    layers = [LayerInfo("embed.weight", (100, 8), 800, "Embedding"), LayerInfo("embed.bias", (8,), 8, "Embedding"),
              LayerInfo("h.0.weight", (8, 8), 64, "Linear"), LayerInfo("h.1.weight", (8, 8), 64, "Linear"),
              LayerInfo("head.weight", (1, 8), 8, "Linear"), LayerInfo("head.bias", (1,), 1, "Linear")]
    assert LayerChoice().pick(layers) == [0, 4]  # the first and the last weight layers
    assert LayerChoice("key").pick(layers, frozenset({"h.1.weight"})) == [0, 3, 4]  # and those findings name
    assert LayerChoice("all").pick(layers) == list(range(6))
    assert LayerChoice(["h.", "head.bias"]).pick(layers) == [2, 3, 5]
    biases = [LayerInfo(f"b{i}", (4,), 4, "Linear") for i in range(3)]
    assert LayerChoice().pick(biases) == [0, 2]  # no weight matrix: the first and the last layer


# ------------------------------------------------------------------------------------------ TensorBoard


def _events(logdir: Path):  # type: ignore[no-untyped-def]
    # TensorBoard's own reader, on its TensorFlow-free file layer (what it uses where TensorFlow is not installed):
    # importing TensorFlow to read a file would take most of this file's time budget.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(logdir), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return acc


def _scalars(acc, tag):  # type: ignore[no-untyped-def]
    ev = acc.Scalars(tag)
    return np.array([e.step for e in ev]), np.array([e.value for e in ev], np.float32)


def _same_as_stored(acc, run) -> None:  # type: ignore[no-untyped-def]
    for name in ("loss", "grad_norm", "lr"):
        steps, values = _scalars(acc, name)
        np.testing.assert_array_equal(steps, run.steps)
        np.testing.assert_allclose(values, run.step_series(name), rtol=1e-6)
    for i in key_layers(run):
        name = run.layers[i].name
        for metric in ("grad_norm", "grad_rms", "update_ratio"):
            stored = run.layer_series(metric)[:, i]
            ok = ~np.isnan(stored)
            steps, values = _scalars(acc, f"{metric}/{name}")
            np.testing.assert_array_equal(steps, run.steps[ok])
            np.testing.assert_allclose(values, stored[ok], rtol=1e-6)
        hsteps, counts, _ = run.histograms()
        hist = acc.Histograms(f"grad_log10_abs/{name}")
        assert [h.step for h in hist] == hsteps.tolist() and len(hist) >= 2
        for k, h in enumerate(hist):
            c = counts[k, i]
            np.testing.assert_array_equal(h.histogram_value.bucket, c[np.flatnonzero(c)[0]: np.flatnonzero(c)[-1] + 1])
    rms = run.layer_series("grad_rms")
    for stat, fn in (("min", np.min), ("median", np.median), ("max", np.max)):
        steps, values = _scalars(acc, over_layers_tag("grad_rms", stat))
        np.testing.assert_array_equal(steps, run.steps)
        np.testing.assert_allclose(values, fn(rms, axis=1), rtol=1e-6)


def test_tensorboard_is_live_and_equals_the_stored_run(tmp_path: Path) -> None:
    model, opt, x, y, w = watched(tmp_path, ["tensorboard"])
    logdir = tmp_path / "run" / "tensorboard"
    with w:
        train(model, opt, x, y, w, 2 * FLUSH + 3)  # two flushes stored, three steps still on the device
        assert w.sinks.drain()
        during = gw.load_run(tmp_path / "run")
        assert during.status == "running" and len(during.steps) == 2 * FLUSH
        _same_as_stored(_events(logdir), during)
        train(model, opt, x, y, w, N_STEPS - 2 * FLUSH - 3)
    run = gw.load_run(tmp_path / "run")
    assert len(run.steps) == N_STEPS and run.status == "finished"
    acc = _events(logdir)
    _same_as_stored(acc, run)
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1  # live only: no export on top at the end
    # each finding once, as text at its first step; charts only for the key layers and the layers findings name
    kinds = [f.kind for f in run.findings]
    assert kinds and set(kinds) <= {t.split("/", 1)[1] for t in acc.Tags()["tensors"]}
    for f in run.findings:
        (text,) = acc.Tensors(f"findings/{f.kind}")
        assert text.step == f.first_step and f"{f.kind}:" in text.tensor_proto.string_val[0].decode()
    charted = {t.split("/", 1)[1] for t in acc.Tags()["scalars"] if t.startswith("grad_rms/")}
    named = {layer for f in run.findings for layer in f.layers[:4]}
    assert charted == {run.layers[i].name for i in key_layers(run)} | named
    assert len(charted) < len(run.layers)


def test_tensorboard_dir_option_and_layers_all(tmp_path: Path) -> None:
    model, opt, x, y, w = watched(tmp_path, {"tensorboard": {"layers": "all"}}, tensorboard=tmp_path / "tb")
    with w:
        train(model, opt, x, y, w, FLUSH)
    run = gw.load_run(tmp_path / "run")
    acc = _events(tmp_path / "tb")
    assert {f"grad_norm/{layer.name}" for layer in run.layers} <= set(acc.Tags()["scalars"])
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_300_layer_model_gets_a_few_charts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(150)])  # 300 parameter tensors
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gw.watch(model, opt, out=tmp_path / "run", quiet=True, flush_every=5, log_to="tensorboard"):
        for _ in range(10):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    run = gw.load_run(tmp_path / "run")
    tags = _events(tmp_path / "run" / "tensorboard").Tags()
    named = {layer for f in run.findings for layer in f.layers[:4]}
    assert len(run.layers) == 300 and len(named) <= 4 * len(run.findings)
    per_layer = [t for t in tags["scalars"] if t.split("/")[0] in ("grad_norm", "grad_rms", "update_ratio") and "/" in t]
    assert len(per_layer) == 3 * len({"0.weight", "149.weight"} | named)
    assert len(tags["scalars"]) + len(tags["histograms"]) <= 30 + 4 * len(named)


# ------------------------------------------------------------------------------------------ MLflow


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):  # type: ignore[no-untyped-def]
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # artifacts go to ./mlruns beside the database
        uri = f"sqlite:///{root}/mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def test_mlflow_sqlite_store_holds_the_run(mlflow_store: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    model, opt, x, y, w = watched(tmp_path, "mlflow", report=True)
    with w:
        train(model, opt, x, y, w, N_STEPS)
    run = gw.load_run(tmp_path / "run")
    client = MlflowClient(mlflow_store)
    (found,) = client.search_runs(["0"], filter_string="attributes.run_name = 'run'")
    rid = found.info.run_id
    assert found.info.status == "FINISHED" and found.data.tags["gradwatch.run_dir"] == str(tmp_path / "run")
    for name in ("loss", "grad_norm", "lr"):
        hist = sorted(client.get_metric_history(rid, f"gradwatch/{name}"), key=lambda m: m.step)
        assert [m.step for m in hist] == run.steps.tolist()
        np.testing.assert_allclose([m.value for m in hist], run.step_series(name), rtol=1e-6)
    for i in key_layers(run):
        hist = sorted(client.get_metric_history(rid, f"gradwatch/grad_rms/{run.layers[i].name}"), key=lambda m: m.step)
        np.testing.assert_allclose([m.value for m in hist], run.layer_series("grad_rms")[:, i], rtol=1e-6)
    kinds = [f.kind for f in run.findings]
    assert kinds and found.data.tags["gradwatch.findings"] == ", ".join(kinds)
    for f in run.findings:
        assert f.summary in found.data.tags[f"gradwatch.finding.{f.kind}"]
    doc = json.loads(Path(client.download_artifacts(rid, "gradwatch/findings.json", str(tmp_path))).read_text())
    assert [d["kind"] for d in doc["findings"]] == kinds  # each finding once
    assert {a.path for a in client.list_artifacts(rid, "gradwatch")} == {"gradwatch/findings.json", "gradwatch/report.html"}


def test_mlflow_logs_into_the_active_run(mlflow_store: str, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    with mlflow.start_run(run_name="mine") as mine:
        mlflow.log_param("lr", 0.1)
        model, opt, x, y, w = watched(tmp_path, ["mlflow"])
        with w:
            train(model, opt, x, y, w, FLUSH)
        assert MlflowClient(mlflow_store).get_run(mine.info.run_id).info.status == "RUNNING"  # left to its owner
    got = MlflowClient(mlflow_store).get_run(mine.info.run_id)
    assert got.data.params == {"lr": "0.1"} and "gradwatch/grad_norm" in got.data.metrics


# ------------------------------------------------------------------------------------------ W&B


def wandb_records(run_dir: Path):  # type: ignore[no-untyped-def]
    """The records of an offline run's .wandb file (LevelDB log blocks holding protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "run-*.wandb"))
    data, pos, block, part = Path(path).read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, n, kind = struct.unpack("<IHB", data[pos: pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7: pos + 7 + n], pos + 7 + n
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            yield record


def wandb_content(run_dir: Path) -> tuple[list[dict], list, dict]:
    rows, alerts, summary = [], [], {}
    # wandb-core may still be writing the file when finish() has returned: wait for the run's exit record
    for _ in range(100):
        records = list(wandb_records(run_dir))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
        elif kind == "alert":
            alerts.append(r.alert)
        elif kind == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.summary.update})
    return rows, alerts, summary


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    home.mkdir()
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    return home


def test_wandb_offline_run_holds_the_run(wandb_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    # No WANDB_MODE and no login: gradwatch starts its own run offline and says so.
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    model, opt, x, y, w = watched(tmp_path, ["wandb"], report=True)
    with w:
        train(model, opt, x, y, w, N_STEPS)
    assert "no W&B login found" in capfd.readouterr().err
    run = gw.load_run(tmp_path / "run")
    (sink,) = w.sinks.sinks
    run_dir = Path(sink.run.dir).parent
    assert run_dir.name.startswith("offline-run-") and sink.own
    rows, alerts, summary = wandb_content(run_dir)
    ours = [r for r in rows if "gradwatch/step" in r]
    assert [r["gradwatch/step"] for r in ours] == run.steps.tolist()
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[f"gradwatch/{name}"] for r in ours], run.step_series(name), rtol=1e-6)
    first = run.layers[key_layers(run)[0]].name
    np.testing.assert_allclose([r[f"gradwatch/grad_rms/{first}"] for r in ours], run.layer_series("grad_rms")[:, 0],
                               rtol=1e-6)
    assert sum(f"gradwatch/grad_log10_abs/{first}/_type" in r for r in ours) == len(run.histograms()[0])
    kinds = [f.kind for f in run.findings]
    assert kinds and sorted(a.title for a in alerts) == sorted(f"gradwatch: {k}" for k in kinds)  # each once
    levels = {"info": "INFO", "warning": "WARN", "error": "ERROR"}
    assert {a.title: a.level for a in alerts} == {f"gradwatch: {f.kind}": levels[f.severity] for f in run.findings}
    assert [d["kind"] for d in summary["gradwatch/findings"]] == kinds
    assert (run_dir / "files" / "run" / "report.html").exists() and (run_dir / "files" / "run" / "findings.json").exists()


def test_wandb_logs_into_the_active_run(wandb_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    mine = wandb.init(project="mine", dir=str(wandb_home), mode="offline")  # (wandb reads the environment once)
    try:
        model, opt, x, y, w = watched(tmp_path, "wandb")
        with w:
            train(model, opt, x, y, w, FLUSH)
        assert wandb.run is mine  # left open for its owner
        mine.log({"accuracy": 0.5})
    finally:
        mine.finish()
    rows, _, _ = wandb_content(Path(mine.dir).parent)
    assert [r["gradwatch/step"] for r in rows if "gradwatch/step" in r] == list(range(FLUSH))
    assert any("accuracy" in r for r in rows)


# ------------------------------------------------------------------------------------------ failures


class Broken(Sink):
    label = "broken"

    def write(self, window) -> None:  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failing_sink_changes_neither_training_nor_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    from gradwatch.report import tensorboard as tbmod

    pytest.importorskip("mlflow")
    model, opt, x, y = make()
    with gw.watch(model, opt, out=tmp_path / "plain", quiet=True, flush_every=FLUSH, sample_every=SAMPLE) as w:
        train(model, opt, x, y, w, N_STEPS)
    reference = [p.detach().clone() for p in model.parameters()]

    real = tbmod.EventWriter.scalars
    calls = []

    def disk_full(self, *a, **k):  # type: ignore[no-untyped-def]
        if threading.current_thread().name.startswith("gradwatch-"):  # the live sink's writes, not the export
            calls.append(1)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(tbmod.EventWriter, "scalars", disk_full)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    gone = {"mlflow": {"tracking_uri": "http://127.0.0.1:9"}}  # nothing listens there
    model, opt, x, y, w = watched(tmp_path, [Broken(), "tensorboard", gone], report=True)
    with w:
        train(model, opt, x, y, w, N_STEPS)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference))  # bit-identical training
    err = capfd.readouterr().err
    for label in ("broken", "TensorBoard", "MLflow"):
        assert err.count(f"gradwatch: stopped logging to {label} (") == 1, err
    assert "No space left on device" in err
    run = gw.load_run(tmp_path / "run")
    assert run.status == "finished" and len(run.steps) == N_STEPS and not run.torn
    assert run.findings and (tmp_path / "run" / "report.html").exists()
    # the TensorBoard sink stopped at its second window: the events are written again, whole, at the end
    acc = _events(tmp_path / "run" / "tensorboard")
    assert len(acc.Scalars("grad_norm")) == N_STEPS
    assert w.sinks.live == []


def test_a_bug_in_the_hub_does_not_reach_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    from gradwatch import sinks_window

    def broken(*a, **k):  # type: ignore[no-untyped-def]
        raise ValueError("a bug")

    monkeypatch.setattr(sinks_window.Merger, "take", broken)
    sink = Recording()
    model, opt, x, y, w = watched(tmp_path, [sink, "tensorboard"], tensorboard=tmp_path / "tb")
    with w:
        train(model, opt, x, y, w, 2 * FLUSH)
    assert capfd.readouterr().err.count("gradwatch: stopped the live sinks (ValueError: a bug)") == 1
    assert sink.windows == [] and len(gw.load_run(tmp_path / "run").steps) == 2 * FLUSH
    assert len(_events(tmp_path / "tb").Scalars("grad_norm")) == 2 * FLUSH  # the export at the end took over


# ------------------------------------------------------------------------------------------ what sinks are given


def test_two_streams_merge_as_the_stored_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g, d = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    og, od = torch.optim.Adam(g.parameters(), 1e-2), torch.optim.SGD(d.parameters(), 1e-2)
    sink = Recording()
    with gw.Watch(None, [og, od], out=tmp_path / "run", quiet=True, flush_every=4, sample_every=3,
                  log_to=[sink]).attach() as w:
        for _ in range(10):
            z = torch.randn(16, 4)
            loss_d = d(g(z).detach()).pow(2).mean()
            od.zero_grad()
            loss_d.backward()
            od.step()
            w.log(loss_d)
            loss_g = -d(g(z)).mean()
            og.zero_grad()
            loss_g.backward()
            og.step()
            w.log(loss_g)
    run = gw.load_run(tmp_path / "run")
    steps = np.concatenate([x.steps for x in sink.windows])
    np.testing.assert_array_equal(steps, run.steps)  # every step once, in order, though the streams flush apart
    for m in ("grad_norm", "loss"):
        np.testing.assert_array_equal(np.concatenate([x.step_values[m] for x in sink.windows]), run.step_series(m))
    layer = np.concatenate([x.layer_values["grad_norm"] for x in sink.windows])
    np.testing.assert_array_equal(layer, run.layer_series("grad_norm"))
    assert sink.end.status == "finished" and sink.sent == [f.kind for f in run.findings if f.kind in sink.sent]


class _Syncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_sinks_add_no_device_read(tmp_path: Path) -> None:
    counts = []
    for k, log_to in enumerate((None, ["tensorboard", Recording()])):
        model, opt, x, y = make()
        with gw.watch(model, opt, out=tmp_path / f"r{k}", quiet=True, flush_every=FLUSH, log_to=log_to) as w:
            with _Syncs() as c:
                train(model, opt, x, y, w, 2 * FLUSH)
        counts.append(c.syncs)
    assert counts[0] == counts[1]


def test_trainer_callbacks_pass_log_to(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.lightning import GradWatch

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, i):  # type: ignore[no-untyped-def]
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    sink = Recording()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[GradWatch(out=tmp_path / "lit", quiet=True, flush_every=5,
                                                                          log_to=[sink])])
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
    run = gw.load_run(tmp_path / "lit")
    np.testing.assert_array_equal(np.concatenate([x.steps for x in sink.windows]), run.steps)
    assert len(run.steps) == 16 and sink.end is not None


def test_gradwatch_run_log_to_logs_an_unmodified_script(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from gradwatch import cli

    script = tmp_path / "train.py"
    script.write_text(
        "import torch\nfrom torch import nn\ntorch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.05)\nx, y = torch.randn(32, 4), torch.randn(32, 1)\n"
        "for _ in range(25):\n"
        "    loss = nn.functional.mse_loss(model(x), y)\n    opt.zero_grad()\n    loss.backward()\n    opt.step()\n")
    out = tmp_path / "run"
    assert cli.main(["run", "--log-to", "tensorboard", "--flush-every", "10", "--no-report", "--out", str(out),
                     str(script)]) == 0
    run = gw.load_run(out)
    steps, values = _scalars(_events(out / "tensorboard"), "grad_norm")
    np.testing.assert_array_equal(steps, run.steps)
    np.testing.assert_allclose(values, run.step_series("grad_norm"), rtol=1e-6)
    assert cli.main(["run", "--log-to", "tensorbord", "--out", str(tmp_path / "bad"), str(script)]) == 2
    assert "unknown sink 'tensorbord' in log_to" in capsys.readouterr().err


def test_the_hugging_face_callback_passes_log_to(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from gradwatch.transformers import GradWatchCallback

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x, labels=None):  # type: ignore[no-untyped-def]
            out = self.net(x)
            return {"loss": nn.functional.mse_loss(out, labels), "logits": out}

    torch.manual_seed(0)
    xs, ys = torch.randn(64, 4), torch.randn(64, 1)
    data = [{"x": xs[i], "labels": ys[i]} for i in range(64)]
    sink = Recording()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    cb = GradWatchCallback(out=tmp_path / "hfrun", quiet=True, report=False, flush_every=5, log_to=[sink])
    Trainer(model=Net(), args=args, train_dataset=data, callbacks=[cb]).train()
    run = gw.load_run(tmp_path / "hfrun")
    np.testing.assert_array_equal(np.concatenate([x.steps for x in sink.windows]), run.steps)
    assert len(run.steps) == 16 and sink.end is not None and sink.end.status == "finished"


def test_gradwatch_optax_passes_log_to(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    import gradwatch.optax as gwx

    params = {"w": jnp.ones((4, 1)) * 0.1, "b": jnp.zeros((1,))}
    x, y = jnp.asarray(np.random.default_rng(0).normal(size=(32, 4)), jnp.float32), jnp.ones((32, 1))

    def loss_fn(p):  # type: ignore[no-untyped-def]
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    sink = Recording()
    tx = gwx.watch(optax.sgd(0.05), out=tmp_path / "jrun", quiet=True, report=False, flush_every=5, log_to=[sink])
    state = tx.init(params)

    @jax.jit
    def step(p, s):  # type: ignore[no-untyped-def]
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    with tx:
        for _ in range(12):
            params, state, loss = step(params, state)
            tx.step(state, loss=loss)
    run = gw.load_run(tmp_path / "jrun")
    np.testing.assert_array_equal(np.concatenate([w.steps for w in sink.windows]), run.steps)
    assert len(run.steps) == 12 and sink.end is not None


def test_an_idle_optimizer_holds_back_a_bounded_number_of_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two optimizers, the second idle after its first step (a phase): the first one's rows wait for it
    only up to MAX_WAITING_ROWS, then reach the sink while the run goes, and none is lost."""
    from gradwatch import sinks_window

    monkeypatch.setattr(sinks_window, "MAX_WAITING_ROWS", 20)
    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    oa, ob = torch.optim.SGD(a.parameters(), 1e-2), torch.optim.SGD(b.parameters(), 1e-2)
    sink = Recording()
    with gw.Watch(None, [oa, ob], out=tmp_path / "run", quiet=True, flush_every=5, log_to=[sink]).attach() as w:
        x = torch.randn(8, 4)
        b(x).pow(2).mean().backward()
        ob.step()
        for _ in range(60):
            oa.zero_grad()
            a(x).pow(2).mean().backward()
            oa.step()
        assert w.sinks.drain()
        during = np.concatenate([x.steps for x in sink.windows]) if sink.windows else np.array([])
        assert 40 <= len(during) <= 60  # sent while b never flushed: all but the last MAX_WAITING_ROWS + a window
        assert sum(len(c) for _, cs in w.sinks._merger._pending.values() for c in cs) <= 20 + 5
    run = gw.load_run(tmp_path / "run")
    assert set(np.concatenate([x.steps for x in sink.windows]).tolist()) == set(run.steps.tolist())
    assert sink.end is not None


def test_the_end_reaches_a_sink_that_is_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink whose queue is full when the run ends still gets its last window and its close: at the end
    they wait for room (up to the close timeout) rather than being dropped as a window mid-run is."""
    from gradwatch import sinks_hub

    monkeypatch.setattr(sinks_hub, "MAX_BEHIND", 1)
    gate = threading.Event()

    class Stuck(Recording):
        def write(self, window) -> None:  # type: ignore[no-untyped-def]
            gate.wait(30)  # the first window holds the sink's thread until the run is closing
            super().write(window)

    sink = Stuck()
    model, opt, x, y, w = watched(tmp_path, [sink])
    with w:
        train(model, opt, x, y, w, N_STEPS + 5)  # four windows: the first held, the queue of one full, others dropped
        threading.Timer(0.5, gate.set).start()  # the close (the last five steps' window) finds the queue full
    run = gw.load_run(tmp_path / "run")
    assert sink.end is not None and sink.end.status == "finished"
    sent = np.concatenate([x.steps for x in sink.windows])
    assert len(sent) < len(run.steps) and sent[-1] == run.steps[-1]  # windows dropped mid-run; not the last one
