"""Which of diffusers' attention processors the pipeline's networks use: the default everywhere but in bf16/fp16 on
the CPU.

There torch's fused CPU attention kernel (behind diffusers' default `AttnProcessor2_0`) runs slower than in fp32:
on the `small` U-Net, bf16 ran 1.23x the fp32 speed with it and 1.83x with diffusers' `AttnProcessor`, whose
baddbmm-softmax-bmm runs as bf16 GEMMs (benchmarks/RESULTS.md). `fit(model)` puts `AttnProcessor` in place of the
default when the model's weights are bf16/fp16 on the CPU and undoes exactly that swap otherwise; processors a
user set are left alone. In fp32, and on GPUs, the processors are diffusers' defaults.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

LOW_PRECISION = (torch.bfloat16, torch.float16)
_MARK = "_latentdiff_cpu_low_precision"  # on the processors fit() put in, so that it can take them out again


def fit(model: torch.nn.Module) -> None:
    """Matmul attention for bf16/fp16 weights on the CPU, diffusers' default otherwise (see the module docstring)."""
    weight = next(model.parameters(), None)
    low = weight is not None and weight.device.type == "cpu" and weight.dtype in LOW_PRECISION
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if low and type(processor) is AttnProcessor2_0:
            replacement = AttnProcessor()
            setattr(replacement, _MARK, True)
            module.set_processor(replacement)
        elif not low and getattr(processor, _MARK, False):
            module.set_processor(AttnProcessor2_0())
