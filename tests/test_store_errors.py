"""Bad input to the store gets one clear sentence: what is wrong, with which path, and what to do."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import RunDirError

# A message "says what to do" when it gives an instruction; these are the verbs one starts with.
ADVICE = re.compile(r"\b(pass|give|choose|point|use|upgrade|install|delete|remove|re-?run|check|restore|record)\b", re.I)


def record(out: Path, hidden: int = 8, steps: int = 6, **options) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with gradwatch.watch(model, opt, out=out, flush_every=4, quiet=True, **options) as w:
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return record(tmp_path_factory.mktemp("good") / "run")


def copy_of(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# Each case builds a bad path under tmp and returns it.
def missing(tmp: Path, run: Path) -> Path:
    return tmp / "no-such-run"


def a_file(tmp: Path, run: Path) -> Path:
    f = tmp / "run.txt"
    f.write_text("not a directory\n")
    return f


def empty_dir(tmp: Path, run: Path) -> Path:
    d = tmp / "empty"
    d.mkdir()
    return d


def other_files_no_meta(tmp: Path, run: Path) -> Path:
    d = tmp / "checkpoints"
    d.mkdir()
    (d / "model.pt").write_bytes(b"\x80\x02")
    (d / "notes.txt").write_text("epoch 3\n")
    return d


def meta_not_json(tmp: Path, run: Path) -> Path:
    d = copy_of(run, tmp / "corrupt")
    (d / "meta.json").write_text('{"format": 1, "tool": "gradw')  # cut off mid-write
    return d


def meta_of_another_tool(tmp: Path, run: Path) -> Path:
    d = tmp / "mlflow"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"run_id": "3f2a", "experiment": 1, "artifact_uri": "file:///x"}))
    return d


def newer_format(tmp: Path, run: Path) -> Path:
    d = copy_of(run, tmp / "future")
    meta = json.loads((d / "meta.json").read_text())
    meta["format"] = 99
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def series_of_another_model(tmp: Path, run: Path) -> Path:
    # meta.json says 4 layers; the series file, copied from a deeper model's run, holds rows of 6.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    deeper = tmp / "deeper"
    with gradwatch.watch(model, opt, out=deeper, flush_every=4, quiet=True):
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    assert len(gradwatch.load_run(run).layers) == 4 and len(gradwatch.load_run(deeper).layers) == 6
    d = copy_of(run, tmp / "mixed")
    shutil.copy(deeper / "series-0.arrow", d / "series-0.arrow")
    return d


CASES = [missing, a_file, empty_dir, other_files_no_meta, meta_not_json, meta_of_another_tool, newer_format,
         series_of_another_model]


@pytest.mark.parametrize("make", CASES, ids=[c.__name__ for c in CASES])
def test_bad_run_directory_gets_one_clear_sentence(make, tmp_path, finished_run):
    path = make(tmp_path, finished_run)
    with pytest.raises(RunDirError) as caught:
        gradwatch.load_run(path)
    msg = str(caught.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    assert ADVICE.search(msg), f"says what is wrong but not what to do: {msg!r}"
    assert caught.value.__suppress_context__ or caught.value.__context__ is None  # no chained traceback


def test_newer_format_message_names_both_versions(tmp_path, finished_run):
    path = newer_format(tmp_path, finished_run)
    with pytest.raises(RunDirError, match="upgrade") as caught:
        gradwatch.load_run(path)
    assert "99" in str(caught.value)


@pytest.mark.parametrize(
    "reader, known",
    [("layer_series", gradwatch.LAYER_METRICS), ("step_series", gradwatch.STEP_METRICS)],
)
def test_unknown_metric_is_a_key_error_listing_the_known_ones(finished_run, reader, known):
    run = gradwatch.load_run(finished_run)
    with pytest.raises(KeyError) as caught:
        getattr(run, reader)("nope")
    msg = caught.value.args[0]
    assert "nope" in msg
    missing = [name for name in known if name not in msg]
    assert not missing, f"not listed: {missing}"
    # and every listed name works
    for name in known:
        assert getattr(run, reader)(name).shape[0] == len(run.steps)


def test_a_new_run_never_mixes_into_an_old_one(tmp_path):
    out = record(tmp_path / "run", steps=9)
    assert len(gradwatch.load_run(out).steps) == 9

    with pytest.raises(RunDirError) as caught:
        record(out, steps=3)
    msg = str(caught.value)
    assert "\n" not in msg and str(out) in msg and "overwrite" in msg
    assert len(gradwatch.load_run(out).steps) == 9  # the refused attempt left the old run intact
    assert gradwatch.load_run(out).status == "finished"

    record(out, steps=3, overwrite=True)
    run = gradwatch.load_run(out)
    assert len(run.steps) == 3  # the old series are gone, not appended to
    assert run.status == "finished"


def test_a_disk_full_at_close_does_not_fail_the_script(tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    """Training is over when the watch closes: a store that cannot write its last window or its
    final meta.json is reported, and the `with` block ends normally (the script can still save its model)."""
    import torch
    from torch import nn

    import gradwatch as gw
    from gradwatch import store

    def full(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "r", quiet=True, report=False):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
        monkeypatch.setattr(store.StreamWriter, "append", full)
        monkeypatch.setattr(store.RunWriter, "finish", full)
    err = capsys.readouterr().err
    assert "could not write the last steps" in err and "could not mark" in err
