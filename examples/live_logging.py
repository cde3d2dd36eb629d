"""Seed 000's sigmoid MLP on make_moons, logged live to TensorBoard, W&B and MLflow while it trains.

    WANDB_MODE=offline MLFLOW_TRACKING_URI=sqlite:///mlflow.db python examples/live_logging.py
    tensorboard --logdir runs/live/tensorboard          # the events, as they are written
    mlflow ui --backend-store-uri sqlite:///mlflow.db   # metrics, the findings' tags, the report
    wandb sync wandb/offline-run-*                      # uploads the offline W&B run later

Needs ``pip install gradwatch[tensorboard,wandb,mlflow] scikit-learn``. Without WANDB_MODE, gradwatch
starts the W&B run offline by itself when there is no W&B login or no route to its server.
"""

import torch
from sklearn.datasets import make_moons
from torch import nn

import gradwatch as gw

torch.manual_seed(0)
x, y = make_moons(n_samples=512, noise=0.1, random_state=0)
x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None]
layers: list[nn.Module] = [nn.Linear(2, 10), nn.Sigmoid()]
for _ in range(4):
    layers += [nn.Linear(10, 10), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(10, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)

with gw.watch(model, opt, out="runs/live", overwrite=True, log_to=["tensorboard", "wandb", "mlflow"]) as w:
    for step in range(600):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.log(loss)
