"""A plain closure loop: LBFGS (or SGD, --optimizer sgd) driven by optimizer.step(closure).

The closure logs, for itself, the global gradient norm at each of its calls; the first call of each
step is the gradient at the step's starting point, the one the step is taken from. Writes them
and each step's returned loss to the JSON file named by the first argument.
"""

import argparse
import json

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("json_out")
parser.add_argument("--optimizer", default="lbfgs")
parser.add_argument("--steps", type=int, default=8)
args = parser.parse_args()

torch.manual_seed(0)
x = torch.randn(128, 4)
y = (x ** 2).sum(1, keepdim=True)
model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
if args.optimizer == "lbfgs":
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
else:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

calls = []  # one list of norms per step


def closure():
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    calls[-1].append(norm.item())
    return loss


losses = []
for step in range(args.steps):
    calls.append([])
    losses.append(opt.step(closure).item())

with open(args.json_out, "w") as f:
    json.dump({"first_norms": [c[0] for c in calls], "calls": [len(c) for c in calls], "losses": losses}, f)
