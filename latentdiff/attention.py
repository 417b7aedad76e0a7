"""The attention processor the pipeline installs: diffusers' own two, each where it is fastest.

`AttnProcessor2_0` (torch's scaled_dot_product_attention) everywhere, except for bf16/fp16 on the CPU: there torch's
fused CPU attention kernel runs slower than in fp32 (measured on the `small` U-Net: 1.23x the fp32 speed in bf16 with
it, 1.83x with plain matmuls and softmax; benchmarks/RESULTS.md), so those calls take `AttnProcessor`'s
baddbmm-softmax-bmm path, which runs as bf16 GEMMs. In fp32, and on GPUs, the numbers are those of diffusers' default.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class LatentAttnProcessor(AttnProcessor2_0):
    _matmul = AttnProcessor()

    def __call__(self, attn, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if hidden_states.device.type == "cpu" and hidden_states.dtype in _LOW_PRECISION:
            return self._matmul(attn, hidden_states, *args, **kwargs)
        return super().__call__(attn, hidden_states, *args, **kwargs)


def install(model: torch.nn.Module) -> None:
    """Put LatentAttnProcessor in place of diffusers' default processor (any other processor is left alone)."""
    for module in model.modules():
        if type(getattr(module, "processor", None)) is AttnProcessor2_0:
            module.set_processor(LatentAttnProcessor())
