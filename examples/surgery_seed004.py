"""Model surgery on seed 004's network (2-5-5-5-5-1, sigmoid): the three reports docs/doctor.md shows.

    .venv/bin/python examples/surgery_seed004.py
"""

import torch
from torch import nn

from gradwatch import surgery

torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(2, 5), nn.Sigmoid(), nn.Linear(5, 5), nn.Sigmoid(),
    nn.Linear(5, 5), nn.Sigmoid(), nn.Linear(5, 5), nn.Sigmoid(),
    nn.Linear(5, 1), nn.Sigmoid(),
)
opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
print(surgery.swap_activations(model, nn.Sigmoid, nn.ReLU))
print(surgery.reinit(model, "he_uniform", seed=0))
print(surgery.insert_norm(model, "batch", optimizer=opt))
