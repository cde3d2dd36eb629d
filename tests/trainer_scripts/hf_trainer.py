"""A plain Hugging Face Trainer script, as a user writes it: an unscaled regression (targets in the
hundreds) that the Trainer's default clipping (max_grad_norm=1.0) hides, logged at every step.

Writes the Trainer's log history (its own pre-clip `grad_norm` and `loss` per step) to the JSON file
named by the first argument. Options: --accumulate K, --steps N, --own-callback DIR.
"""

import argparse
import json

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("json_out")
parser.add_argument("--accumulate", type=int, default=1)
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--own-callback", default=None)
args = parser.parse_args()


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=256):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = 100 * self.x.sum(1, keepdim=True) + 300  # unscaled targets

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x, labels):
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


torch.manual_seed(0)
callbacks = []
if args.own_callback:
    from gradwatch.transformers import GradWatchCallback

    callbacks.append(GradWatchCallback(out=args.own_callback, quiet=True, report=False))
training_args = TrainingArguments(output_dir=args.json_out + ".hf", max_steps=args.steps, logging_steps=1,
                                  per_device_train_batch_size=16, gradient_accumulation_steps=args.accumulate,
                                  learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                  disable_tqdm=True, dataloader_pin_memory=False)
trainer = Trainer(model=Regressor(), args=training_args, train_dataset=Pairs(), callbacks=callbacks)
trainer.train()
with open(args.json_out, "w") as f:
    json.dump({"log_history": trainer.state.log_history,
               "callbacks": [type(c).__name__ for c in trainer.callback_handler.callbacks]}, f)
