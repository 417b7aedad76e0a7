"""Traced inference gives the eager pipeline's images exactly, and never replays a graph that no longer applies."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from latentdiff import LatentDiffusionPipeline
from latentdiff.tracing import TracedCall, traceable

from conftest import seeded

STEPS = 4


def run(pipe, **kw):
    return pipe(["a tiger", "a red apple"], num_inference_steps=STEPS, generator=[seeded(0), seeded(1)],
                output_type="np", **kw).images


def eager(pipe, **kw):
    pipe.use_tracing = False
    try:
        return run(pipe, **kw)
    finally:
        pipe.use_tracing = True


def test_traced_pipeline_gives_the_eager_images_bit_for_bit(tiny_pipe):
    first = run(tiny_pipe)
    assert not tiny_pipe._traced_unet._graphs  # a first call runs eagerly: recording would cost more than it saves
    traced = run(tiny_pipe)
    assert tiny_pipe._traced_unet._graphs and tiny_pipe._traced_decoder._graphs  # the traces did run
    np.testing.assert_array_equal(traced, first)
    np.testing.assert_array_equal(traced, eager(tiny_pipe))
    np.testing.assert_array_equal(run(tiny_pipe, guidance_scale=1.0), eager(tiny_pipe, guidance_scale=1.0))


def test_a_graph_per_input_shape(tiny_pipe):
    run(tiny_pipe), run(tiny_pipe)
    tiny_pipe("a tiger", num_inference_steps=STEPS, generator=seeded(), output_type="np")
    one = tiny_pipe("a tiger", num_inference_steps=STEPS, generator=seeded(), output_type="np").images
    tiny_pipe.use_tracing = False
    np.testing.assert_array_equal(one, tiny_pipe("a tiger", num_inference_steps=STEPS, generator=seeded(),
                                                 output_type="np").images)
    assert len(tiny_pipe._traced_unet._graphs) == 2  # batch 4 (two prompts, guided) and batch 2


def test_weights_changed_in_place_are_seen(tiny_pipe):
    run(tiny_pipe)
    before = run(tiny_pipe)
    with torch.no_grad():
        for p in tiny_pipe.unet.parameters():
            p.mul_(1.5)
    after = run(tiny_pipe)  # the same graph
    assert len(tiny_pipe._traced_unet._graphs) == 1 and np.abs(after - before).max() > 1e-3
    np.testing.assert_array_equal(after, eager(tiny_pipe))


def twice(pipe):
    """The second call, which replays (and, the first time, records) the graph."""
    run(pipe)
    return run(pipe)


def test_replaced_processors_and_python_settings_get_a_new_graph(tiny_pipe):
    twice(tiny_pipe)
    graphs = len(tiny_pipe._traced_unet._graphs)
    tiny_pipe.unet.set_attn_processor(AttnProcessor())  # another implementation of the same attention
    np.testing.assert_array_equal(twice(tiny_pipe), eager(tiny_pipe))
    assert len(tiny_pipe._traced_unet._graphs) == graphs + 1
    tiny_pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # plain floats on the up blocks
    freeu = twice(tiny_pipe)
    assert len(tiny_pipe._traced_unet._graphs) == graphs + 2
    np.testing.assert_array_equal(freeu, eager(tiny_pipe))
    tiny_pipe.unet.disable_freeu()
    assert np.abs(twice(tiny_pipe) - freeu).max() > 0


def test_untraceable_states_run_eagerly():
    unet = torch.nn.Linear(2, 2).eval()
    with torch.no_grad():
        assert traceable(unet)
        assert not traceable(unet.train())
        unet.eval().register_forward_pre_hook(lambda *a: None)
        assert not traceable(unet)
    assert not traceable(torch.nn.Linear(2, 2).eval())  # autograd on: a trace would drop the graph's history
    calls = []
    traced = TracedCall(lambda m, x: calls.append(1) or m(x))
    with torch.no_grad():
        for _ in range(2):
            f = traced.bind(unet)
            f(torch.ones(1, 2)), f(torch.ones(1, 2))
    assert calls == [1] * 4 and not traced._graphs  # eager every time


def test_lora_adapters_run_eagerly_and_change_the_image(tiny_pipe):
    from peft import LoraConfig

    before = run(tiny_pipe)
    tiny_pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    assert not traceable(tiny_pipe.unet)
    after = run(tiny_pipe)
    assert np.abs(after - before).max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_reduced_precision_runs_the_networks_in_it_and_the_sampler_in_float32(tiny_dir, dtype):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    reference = run(pipe)
    pipe.to(dtype=dtype)
    run(pipe)  # the next call replays a graph
    seen = []
    original_step = pipe.scheduler.step
    pipe.scheduler.step = lambda output, t, sample, **kw: seen.append((output.dtype, sample.dtype)) or \
        original_step(output, t, sample, **kw)
    low = run(pipe)
    assert pipe.unet.dtype == dtype and set(seen) == {(torch.float32, torch.float32)}
    latents = pipe("a tiger", num_inference_steps=STEPS, generator=seeded(), output_type="latent").images
    assert latents.dtype == torch.float32
    assert np.isfinite(low).all() and 0 < np.abs(low - reference).mean() < 0.05


def test_the_pipeline_attention_is_diffusers_default_in_fp32_and_plain_matmuls_in_bf16_on_cpu(tiny_pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from latentdiff.attention import LatentAttnProcessor

    attn = next(m for m in tiny_pipe.unet.modules() if isinstance(getattr(m, "processor", None), LatentAttnProcessor))
    assert all(isinstance(p, LatentAttnProcessor) for p in tiny_pipe.vae.attn_processors.values())
    x = torch.randn(2, 16, attn.to_q.in_features)
    with torch.no_grad():
        ours = attn.processor(attn, x)
        torch.testing.assert_close(ours, AttnProcessor2_0()(attn, x), rtol=0, atol=0)
        calls = []
        attn.processor._matmul = lambda *a, **kw: calls.append(1) or LatentAttnProcessor._matmul(*a, **kw)
        try:
            low = attn.to(torch.bfloat16).processor(attn, x.bfloat16())
        finally:
            del attn.processor._matmul
            attn.float()
    assert calls == [1] and low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ours, rtol=0.05, atol=0.05)
