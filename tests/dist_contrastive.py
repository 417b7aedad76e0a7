"""Run under `accelerate launch --multi_gpu --num_processes 2` (on a CPU-only machine: 2 CPU processes over gloo): the contrastive loss and its gradients, computed with the
global batch split across the processes, equal one process's on the whole batch. Prints OK or raises."""

import torch
from accelerate import Accelerator
from open_clip.loss import ClipLoss

from latentdiff.training.clip import contrastive_loss

accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
g = torch.Generator().manual_seed(0)
image_all = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
text_all = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
scale = torch.tensor(14.0)

# one process, whole batch
image_ref, text_ref = image_all.clone().requires_grad_(), text_all.clone().requires_grad_()
reference = ClipLoss()(image_ref, text_ref, scale)
reference.backward()

# this process's half, features gathered with gradients
share = slice(rank * 8 // world, (rank + 1) * 8 // world)
image_mine, text_mine = image_all[share].clone().requires_grad_(), text_all[share].clone().requires_grad_()
loss = contrastive_loss(accelerator)(image_mine, text_mine, scale)
# DDP averages parameter gradients over processes; do the same to the feature gradients
(loss / world).backward()
torch.testing.assert_close(loss, reference)
torch.testing.assert_close(image_mine.grad, image_ref.grad[share])
torch.testing.assert_close(text_mine.grad, text_ref.grad[share])
accelerator.print(f"OK {world} processes: loss {loss.item():.6f} = {reference.item():.6f}")
accelerator.end_training()  # tear the process group down before exit: gloo threads alive at exit can abort a rank
