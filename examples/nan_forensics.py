"""A training script whose loss turns NaN, for `gradwatch run` to say where the NaN came from.

A price model takes log-prices inside its encoder. Prices are positive, except that a few records
of the generated data (rows 1000-1003, as a data-entry error would put them) hold a negative price.
The loss goes NaN at the step whose batch holds them; nothing in the script says why.

    gradwatch run examples/nan_forensics.py              # forensics on (the default)
    gradwatch run --no-forensics examples/nan_forensics.py
"""

import torch
from sklearn.datasets import make_regression
from torch import nn


class LogPrice(nn.Module):
    """Column 0 is a price: the model sees its log."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.log(x[:, :1]), x[:, 1:]], dim=1)


def main() -> None:
    torch.manual_seed(0)
    X, y = make_regression(n_samples=2048, n_features=8, noise=5.0, random_state=0)
    X = torch.tensor(X, dtype=torch.float32)
    X[:, 0] = X[:, 0].abs() * 100 + 1  # prices, positive
    X[1000:1004, 0] = -X[1000:1004, 0]  # four bad records
    y = torch.tensor(y, dtype=torch.float32).unsqueeze(1) / 100

    model = nn.Sequential(
        nn.Sequential(LogPrice(), nn.Linear(8, 64), nn.ReLU()),  # the encoder
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 1),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(2):
        for i in range(0, len(X), 64):
            xb, yb = X[i:i + 64], y[i:i + 64]
            loss = nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
