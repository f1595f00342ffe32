"""A plain DDP Lightning job on gloo with PerseusCallback: one stage per rank, extrinsic savings only.

Launch with ``python -m torch.distributed.run --nproc-per-node 2 ddp_worker.py OUTPUT_DIR --steps S
--callback JSON``. Forward and backward are real matrix products (so emulated clocks stretch them).
Every rank writes ``OUTPUT_DIR/rank<r>.json`` with the callback's summary.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from perseus_lightning.integrations.lightning import PerseusCallback

WIDTH = 1024
ROWS = 256


class MLP(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.layers(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--callback", default="{}", help="PerseusCallback keyword arguments, as JSON")
    args = parser.parse_args()

    torch.set_num_threads(1)
    perseus = PerseusCallback(**json.loads(args.callback))
    batches = args.steps * args.accumulate
    generator = torch.Generator().manual_seed(int(os.environ["RANK"]))
    data = TensorDataset(torch.randn(batches * ROWS, WIDTH, generator=generator), torch.randn(batches * ROWS, WIDTH, generator=generator))
    trainer = Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy="ddp", max_steps=args.steps,
        accumulate_grad_batches=args.accumulate, callbacks=[perseus], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(MLP(), DataLoader(data, batch_size=ROWS))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"rank{dist.get_rank()}.json").write_text(json.dumps({"summary": perseus.summary()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
