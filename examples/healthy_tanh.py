"""A healthy run for gradwatch doctor to leave alone: make_moons, MLP 2-16-16-1 tanh with
PyTorch's default init, Adam(1e-2), 20 epochs, batch 32. Prints its accuracy.

    gradwatch doctor --metric accuracy examples/healthy_tanh.py
"""

import torch
from sklearn.datasets import make_moons
from torch import nn

torch.manual_seed(0)
X, y = make_moons(n_samples=1000, noise=0.2, random_state=0)
X = torch.tensor(X, dtype=torch.float32)
y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for epoch in range(20):
    perm = torch.randperm(len(X))
    for i in range(0, len(X), 32):
        idx = perm[i:i + 32]
        loss = nn.functional.binary_cross_entropy_with_logits(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
with torch.no_grad():
    print("accuracy", ((model(X) > 0).float() == y).float().mean().item())
