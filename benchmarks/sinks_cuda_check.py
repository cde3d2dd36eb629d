#!/usr/bin/env python
"""On a CUDA machine: live sinks add no device read, and change nothing in training.

Trains an 8x512 MLP with Adam on the GPU three times (a warm-up, without sinks, with
``log_to=["tensorboard", <a recording sink>]``) and prints, per step, the synchronising CUDA calls
that ``torch.cuda.set_sync_debug_mode("warn")`` reports (the same list with and without sinks means
the sinks read nothing from the device), whether the final weights are bit-identical
(``torch.use_deterministic_algorithms``), and whether TensorBoard's live events equal the stored run.

    python benchmarks/sinks_cuda_check.py          # exits 1 if a check fails, 0 without CUDA (skipped)
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
import warnings
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

try:
    import gradwatch as gw
except ImportError:  # not installed: the repository's
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import gradwatch as gw
from gradwatch.sinks import Sink  # noqa: E402


class Recording(Sink):
    label = "recording"

    def __init__(self) -> None:
        super().__init__("all")
        self.rows = 0

    def write(self, window) -> None:  # type: ignore[no-untyped-def]
        self.rows += len(window)


def train(log_to: object, out: Path, steps: int = 40) -> tuple[list[int], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(512, 512), nn.ReLU())], nn.Linear(512, 10)).cuda()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator(device="cuda").manual_seed(1)
    x, y = torch.randn(256, 512, device="cuda", generator=g), torch.randint(0, 10, (256,), device="cuda", generator=g)
    syncs = []
    with gw.watch(model, opt, out=out, quiet=True, flush_every=10, sample_every=5, log_to=log_to) as w:
        for _ in range(steps):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    w.log(loss)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs.append(sum("synchronizing CUDA operation" in str(m.message) for m in seen))
        if w.sinks is not None:
            w.sinks.drain()
    return syncs, [p.detach().cpu().clone() for p in model.parameters()]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    torch.use_deterministic_algorithms(True)
    tmp = Path(tempfile.mkdtemp(prefix="gradwatch-sinks-cuda-"))
    train(None, tmp / "warmup")  # CUDA's and cuBLAS's lazy starts are nobody's
    base_syncs, base_w = train(None, tmp / "plain")
    rec = Recording()
    sink_syncs, sink_w = train(["tensorboard", rec], tmp / "live")
    run = gw.load_run(tmp / "live")
    # TensorBoard's own reader on its TensorFlow-free file layer
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(tmp / "live" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = np.array([e.value for e in acc.Scalars("grad_norm")], np.float32)
    checks = {
        "sync calls per step equal with and without sinks": base_syncs == sink_syncs,
        "bit-identical weights": all(torch.equal(a, b) for a, b in zip(base_w, sink_w)),
        "every stored step reached the sinks": rec.rows == len(run.steps) == len(tb),
        "TensorBoard grad_norm equals the stored run": bool(np.allclose(tb, run.step_series("grad_norm"), rtol=1e-6)),
    }
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("sync calls per step without sinks:", base_syncs)
    print("sync calls per step with sinks:   ", sink_syncs)
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
