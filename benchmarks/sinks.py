#!/usr/bin/env python
"""What live logging costs: gradwatch with each sink on, beside wandb.watch(log="all"), in one run.

The methods of benchmarks/overhead.py (same models, same interleaved windows, same weight check),
plus gradwatch with ``log_to`` TensorBoard, W&B (offline), MLflow (a local SQLite store) and all
three. Every gradwatch method uses gradwatch's defaults (flush every 50 steps, full statistics
every 50), so each timed window of 50 steps holds one flush and its sink work.

    .venv/bin/python benchmarks/sinks.py                  # the 24x512 MLP, a few minutes on 2 cores
    .venv/bin/python benchmarks/sinks.py --models mlp,cnn,transformer
    .venv/bin/python benchmarks/sinks.py --quick          # smoke run, numbers meaningless

The sinks write on threads of their own; the time they take there shows as far as it competes
with training for the CPU (on this 2-core machine, it does). Work a sink thread is still doing
when a window ends is charged to the next method in the rotation, like wandb-core's.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (sets WANDB_MODE=offline and friends before wandb can be imported)
from overhead import GRADWATCH_SETTINGS, Trainee, Unavailable, import_gradwatch, train_step  # noqa: E402


class _WithSinks:
    """gradwatch.watch(..., log_to=...) kept open across all repeats, like overhead.Gradwatch."""

    def log_to(self, workdir: Path) -> object:
        raise NotImplementedError

    def __init__(self, t: Trainee, workdir: Path):
        gw = import_gradwatch()
        self.t = t
        workdir.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self.w = self._stack.enter_context(
            gw.watch(t.model, t.optimizer, out=workdir / "gradwatch", quiet=True, log_to=self.log_to(workdir),
                     **GRADWATCH_SETTINGS))

    def step(self) -> None:
        self.w.log(loss=train_step(self.t))

    def close(self) -> None:
        self._stack.close()


def _wandb_run(workdir: Path) -> object:
    """A run of its own (offline), so that gradwatch does not log into wandb.watch's run."""
    try:
        import wandb
    except ImportError as e:
        raise Unavailable(f"wandb not importable: {e}") from e
    return wandb.init(mode="offline", dir=str(workdir), project="gradwatch-sinks", name=workdir.name,
                      reinit="create_new")


def _mlflow(workdir: Path) -> dict:
    """A SQLite store in the benchmark's directory, with its artifacts there too (not in ./mlruns)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise Unavailable(f"mlflow not importable: {e}") from e
    uri = f"sqlite:///{workdir}/mlflow.db"
    MlflowClient(uri).create_experiment("gradwatch-sinks", artifact_location=(workdir / "mlflow-artifacts").as_uri())
    return {"tracking_uri": uri, "experiment": "gradwatch-sinks"}


class WithTensorBoard(_WithSinks):
    def log_to(self, workdir: Path) -> object:
        return ["tensorboard"]


class WithWandb(_WithSinks):
    def log_to(self, workdir: Path) -> object:
        self.run = _wandb_run(workdir)
        return {"wandb": {"run": self.run}}

    def close(self) -> None:
        super().close()
        self.run.finish()  # type: ignore[attr-defined]


class WithMlflow(_WithSinks):
    def log_to(self, workdir: Path) -> object:
        return {"mlflow": _mlflow(workdir)}


class WithAll(WithWandb):
    def log_to(self, workdir: Path) -> object:
        self.run = _wandb_run(workdir)
        return {"tensorboard": {}, "wandb": {"run": self.run}, "mlflow": _mlflow(workdir)}


SINK_METHODS = {
    "gradwatch + tensorboard": WithTensorBoard,
    "gradwatch + wandb": WithWandb,
    "gradwatch + mlflow": WithMlflow,
    "gradwatch + all three": WithAll,
}
ALIASES = {"tensorboard": "gradwatch + tensorboard", "wandb-sink": "gradwatch + wandb", "mlflow": "gradwatch + mlflow",
           "all": "gradwatch + all three"}
# wandb.watch is set up before the sink methods: its run must be the process's wandb.run, and theirs
# (reinit="create_new") must not be.
DEFAULT_METHODS = ["unmonitored", "gradwatch", "wandb.watch", *SINK_METHODS]


def main(argv: list[str] | None = None) -> int:
    overhead.METHODS.update(SINK_METHODS)
    overhead.METHOD_ALIASES.update(ALIASES)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--models" or a.startswith("--models=") for a in argv):
        argv += ["--models", "mlp"]
    if not any(a == "--methods" or a.startswith("--methods=") for a in argv):
        argv += ["--methods", ",".join(DEFAULT_METHODS)]
    return overhead.main(argv)


if __name__ == "__main__":
    sys.exit(main())
