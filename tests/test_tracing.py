"""Traced inference gives the eager pipeline's images exactly, and never replays a graph that no longer applies."""

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor

from latentdiff import LatentDiffusionPipeline
from latentdiff.pipelines.tracing import TracedCall, traceable

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
    after = run(tiny_pipe)  # the graph of the old weights went (an in-place change bumps their version)
    assert not tiny_pipe._traced_unet._graphs and np.abs(after - before).max() > 1e-3
    np.testing.assert_array_equal(after, eager(tiny_pipe))


def twice(pipe):
    """The second call, which replays (and, the first time, records) the graph."""
    run(pipe)
    return run(pipe)


def test_replaced_processors_and_python_settings_get_a_new_graph(tiny_pipe):
    graphs = tiny_pipe._traced_unet._graphs
    twice(tiny_pipe)
    first = set(graphs)
    tiny_pipe.unet.set_attn_processor(AttnProcessor())  # another implementation of the same attention
    np.testing.assert_array_equal(twice(tiny_pipe), eager(tiny_pipe))
    second = set(graphs)
    assert second and second.isdisjoint(first)  # a new graph; the old one dropped
    tiny_pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # plain floats on the up blocks
    freeu = twice(tiny_pipe)
    assert graphs and set(graphs).isdisjoint(second)
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


def test_lora_adapters_anywhere_run_eagerly(tiny_pipe):
    from peft import LoraConfig, inject_adapter_in_model

    before = twice(tiny_pipe)  # a graph of the plain U-Net exists
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False),
                            tiny_pipe.unet.up_blocks)  # LoRA layers deep inside, no peft_config on the U-Net
    assert not traceable(tiny_pipe.unet)
    after = run(tiny_pipe)
    assert np.abs(after - before).max() > 1e-4
    np.testing.assert_array_equal(after, eager(tiny_pipe))


def test_autocast_compile_and_offload_hooks_run_eagerly(tiny_pipe):
    twice(tiny_pipe)  # graphs recorded in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run(tiny_pipe)
        np.testing.assert_array_equal(autocast, eager(tiny_pipe))
    assert np.abs(autocast - run(tiny_pipe)).max() > 0
    with torch.no_grad():
        assert traceable(tiny_pipe.unet)
        setattr(tiny_pipe.unet.conv_in, "_diffusers_hook", object())
        assert not traceable(tiny_pipe.unet)
        del tiny_pipe.unet.conv_in._diffusers_hook
        tiny_pipe.unet.mid_block.compile()  # in place, one part only
        assert not traceable(tiny_pipe.unet)


def test_replaced_modules_drop_their_graphs_and_copies_start_without_any(tiny_pipe):
    import copy
    import pickle

    twice(tiny_pipe)
    old = tiny_pipe._traced_unet._graphs
    assert old
    copied = copy.deepcopy(tiny_pipe)
    assert not copied._traced_unet._graphs and pickle.loads(pickle.dumps(tiny_pipe._traced_unet)).fn is not None
    np.testing.assert_array_equal(run(copied), run(tiny_pipe))
    tiny_pipe.unet = copied.unet
    run(tiny_pipe)
    assert not tiny_pipe._traced_unet._graphs  # the old U-Net's graphs went at the bind: its weights can be freed


def test_reduced_precision_runs_the_networks_in_it_and_the_sampler_in_float32(tiny_dir, monkeypatch):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    reference = run(pipe)
    pipe.to(dtype=torch.bfloat16)
    seen = []
    original_step = type(pipe.scheduler).step  # on the class: each call steps its own copy of the scheduler
    monkeypatch.setattr(type(pipe.scheduler), "step", lambda self, output, t, sample, **kw: seen.append(
        (output.dtype, sample.dtype)) or original_step(self, output, t, sample, **kw))
    low = twice(pipe)
    assert pipe.unet.dtype == torch.bfloat16 and pipe._traced_unet._graphs
    assert set(seen) == {(torch.float32, torch.float32)}
    assert np.isfinite(low).all() and 0 < np.abs(low - reference).mean() < 0.05
    latents = pipe("a tiger", num_inference_steps=STEPS, generator=seeded(), output_type="latent").images
    assert latents.dtype == torch.bfloat16  # as diffusers returns them, ready for pipe.vae.decode
    pipe.vae.decode(latents / pipe.vae.config.scaling_factor)


def test_bf16_on_the_cpu_swaps_in_diffusers_matmul_attention_and_back(tiny_dir):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    kinds = lambda: {type(p) for m in (pipe.unet, pipe.vae) for p in m.attn_processors.values()}  # noqa: E731
    assert kinds() == {AttnProcessor2_0}  # fp32: diffusers' default, untouched
    pipe.to(dtype=torch.bfloat16)
    assert kinds() == {AttnProcessor}
    pipe.unet.set_default_attn_processor()  # diffusers' own checks accept it
    pipe.to(dtype=torch.float32)
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor}  # the user's choice stays
    assert {type(p) for p in pipe.vae.attn_processors.values()} == {AttnProcessor2_0}  # ours is undone
    bf16 = LatentDiffusionPipeline.from_pretrained(tiny_dir, torch_dtype=torch.bfloat16)
    assert {type(p) for p in bf16.unet.attn_processors.values()} == {AttnProcessor}
