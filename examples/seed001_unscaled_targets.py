# seed 001: MLP on unscaled make_regression targets, SGD(0.01, momentum 0.9) -> NaN
import torch
from torch import nn
from sklearn.datasets import make_regression
x, y = make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=1)
x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None]
torch.manual_seed(1)
model = nn.Sequential(nn.Linear(20, 25), nn.ReLU(), nn.Linear(25, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
for epoch in range(3):
    for i in range(0, 500, 32):
        loss = nn.functional.mse_loss(model(x[i:i + 32]), y[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
print("final loss", loss.item())
