"""A plain Lightning script, as a user writes it: a 7-layer sigmoid classifier, Trainer(max_epochs=3).

It logs, for itself, the global gradient norm Lightning's own `on_before_optimizer_step` sees and the
loss of every optimizer step, and writes them to the JSON file named by the first argument.
Options: --accumulate K, --clip V (gradient_clip_val), --epochs N, --standalone (import
pytorch_lightning instead of lightning.pytorch), --own-callback DIR (the script adds gradwatch's
callback itself, writing to DIR), --logdir DIR (a CSVLogger there).
"""

import argparse
import json
import math

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("json_out")
parser.add_argument("--accumulate", type=int, default=1)
parser.add_argument("--clip", type=float, default=None)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--standalone", action="store_true")
parser.add_argument("--own-callback", default=None)
parser.add_argument("--logdir", default=None)
args = parser.parse_args()

if args.standalone:
    import pytorch_lightning as pl
else:
    import lightning.pytorch as pl


def circles(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    label = (torch.rand(n, generator=g) > 0.5).float()
    radius = torch.where(label > 0, 0.5, 1.0) + 0.05 * torch.randn(n, generator=g)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    return x, label[:, None]


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        layers, width = [], 2
        for _ in range(6):
            layers += [nn.Linear(width, 16), nn.Sigmoid()]
            width = 16
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.norms, self.micro_losses, self.step_of_micro = [], [], []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self.net(x), y)
        self.micro_losses.append(loss.item())
        self.step_of_micro.append(self.trainer.global_step)
        return loss

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.norms.append(norm.item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


torch.manual_seed(0)
x, y = circles()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
model = Classifier()
callbacks = []
if args.own_callback:
    from gradwatch.lightning import GradWatch

    callbacks.append(GradWatch(out=args.own_callback, quiet=True, report=False))
logger = pl.loggers.CSVLogger(args.logdir, name="lit") if args.logdir else False
trainer = pl.Trainer(max_epochs=args.epochs, accumulate_grad_batches=args.accumulate, gradient_clip_val=args.clip,
                     callbacks=callbacks, logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)
trainer.fit(model, loader)

steps = max(model.step_of_micro) + 1
losses = [sum(loss for loss, s in zip(model.micro_losses, model.step_of_micro) if s == k) / args.accumulate
          for k in range(steps)]
with open(args.json_out, "w") as f:
    json.dump({"norms": model.norms, "losses": losses, "user_callbacks": [type(c).__name__ for c in callbacks],
               "trainer_callbacks": [type(c).__name__ for c in trainer.callbacks],
               "log_dir": trainer.logger.log_dir if trainer.logger else None}, f)
