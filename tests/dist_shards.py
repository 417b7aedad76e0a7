"""Run under `accelerate launch --multi_gpu --num_processes 2` with SHARDS=folder: each process reads its ShardStream
through a DataLoader with 2 workers for two epochs; the processes' sample indices are gathered and checked: no
sample read twice in an epoch, every process the same number of batches. Prints OK or raises."""

import os

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from latentdiff.data.shards import ShardStream, list_shards

accelerator = Accelerator(cpu=True)
shards = list_shards(os.environ["SHARDS"])
stream = ShardStream(shards, 32, 4, seed=3, rank=accelerator.process_index, world=accelerator.num_processes,
                     workers=2)
loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
for epoch in range(2):
    stream.set_epoch(epoch)
    mine = [int(i) for batch in loader for i in batch["indices"]]
    assert len(mine) == len(loader) * 4, (len(mine), len(loader))
    everyone = gather_object([mine])
    if accelerator.is_main_process:
        seen = [i for indices in everyone for i in indices]
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a sample was read twice"
        assert len({len(indices) for indices in everyone}) == 1, "processes read different numbers of batches"
        print(f"OK epoch {epoch}: {len(seen)} distinct samples over {accelerator.num_processes} processes")
accelerator.end_training()
