"""An MLP under ClipNorm(1.0) and SkipNonFinite(), with NaN and Inf injected into its gradients at
steps 30 and 70; writes runs/guarded-nan (report included) and the norm plot docs/guards.md shows.

    .venv/bin/python examples/guarded_nan.py
"""

import torch
from torch import nn

import gradwatch as gw
from gradwatch.guards import ClipNorm, SkipNonFinite
from gradwatch.report.plots import norm_plot
from gradwatch.testing import FaultInjector

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x = torch.randn(256, 10)
y = x.sum(1, keepdim=True) * 5
inj = FaultInjector(model, opt, {30: "nan", 70: "inf"})
with gw.watch(model, opt, out="runs/guarded-nan", overwrite=True, guards=[ClipNorm(1.0), SkipNonFinite()]) as w:
    for step in range(120):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.log(loss)
fig = norm_plot(gw.load_run("runs/guarded-nan"))
fig.savefig("docs/img/guards-norm.png", dpi=110, bbox_inches="tight")
