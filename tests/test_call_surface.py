"""diffusers' StableDiffusionPipeline call surface on LatentDiffusionPipeline (issue 15): each feature against
diffusers' own pipeline on the same weights, or against the equation or behaviour it stands for."""

import threading

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from conftest import seeded
from latentdiff import LatentDiffusionPipeline

STEPS = 3


@pytest.fixture
def both(tiny_dir):
    ours = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def _close(a, b, atol=2e-5):
    as_array = lambda x: x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(as_array(a), as_array(b), atol=atol)


def test_encode_prompt_has_diffusers_signature_and_results(both):
    ours, theirs = both
    args = (["a tiger", "a cat"], "cpu", 2, True, ["blurry", "dark"])
    for a, b in zip(ours.encode_prompt(*args), theirs.encode_prompt(*args)):
        _close(a, b)
    positive, negative = ours.encode_prompt("a tiger", "cpu", 1, False)
    assert positive.shape[0] == 1 and negative is None
    skipped, _ = ours.encode_prompt("a tiger", "cpu", 1, False, clip_skip=1)
    # clip_skip = 1: the states one layer before the last, through the final layer norm (diffusers 0.42 looks for
    # text_encoder.text_model, which transformers 5 no longer has, so it is checked against the definition)
    with torch.no_grad():
        states = ours.text_encoder(ours.tokenize(["a tiger"]), output_hidden_states=True).hidden_states[-2]
        _close(skipped, ours.text_encoder.final_layer_norm(states))
    assert not torch.allclose(skipped, positive)


def test_prompt_embeds_give_the_image_the_prompt_gives(both):
    ours, theirs = both
    positive, negative = ours.encode_prompt("a tiger", "cpu", 1, True, "blurry")
    by_text = ours("a tiger", negative_prompt="blurry", num_inference_steps=STEPS, generator=seeded(), output_type="np")
    by_embeds = ours(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=STEPS,
                     generator=seeded(), output_type="np")
    theirs_embeds = theirs(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=STEPS,
                           generator=seeded(), output_type="np")
    _close(by_text.images, by_embeds.images, atol=1e-6)
    _close(by_embeds.images, theirs_embeds.images, atol=1 / 255)
    assert by_text.nsfw_content_detected is None  # StableDiffusionPipelineOutput, as diffusers returns


@pytest.mark.parametrize("kwargs,message", [
    ({}, "pass prompt or prompt_embeds"),
    ({"prompt": "a", "prompt_embeds": torch.zeros(1, 16, 32)}, "pass prompt or prompt_embeds"),
    ({"prompt_embeds": torch.zeros(1, 16, 5)}, r"prompt_embeds must be a tensor \(batch, tokens, 32\)"),
    ({"prompt_embeds": torch.zeros(1, 16, 32), "negative_prompt_embeds": torch.zeros(2, 16, 32)},
     "negative_prompt_embeds must have the shape of prompt_embeds"),
    ({"prompt": "a", "negative_prompt": "b", "negative_prompt_embeds": torch.zeros(1, 16, 32)},
     "pass negative_prompt or negative_prompt_embeds, not both"),
    ({"prompt": "a", "timesteps": [999, 500], "sigmas": [1.0, 0.5]}, "pass timesteps or sigmas, not both"),
    ({"prompt": "a", "sigmas": [1.0, 0.5]}, "sigmas needs a scheduler whose set_timesteps takes custom sigmas"),
    ({"prompt": "a", "callback_on_step_end_tensor_inputs": ["noise"]},
     r"callback_on_step_end_tensor_inputs must be some of"),
])
def test_bad_embeds_and_schedules_are_named(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(num_inference_steps=2, **kwargs)


def test_custom_sigmas_and_timesteps_match_diffusers(both):
    ours, theirs = both
    for pipe in both:
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sigmas = [14.615, 4.734, 1.0, 0.0292]  # an Align-Your-Steps-like schedule
    a = ours("a tiger", sigmas=sigmas, generator=seeded(), output_type="np").images
    b = theirs("a tiger", sigmas=sigmas, generator=seeded(), output_type="np").images
    _close(a, b, atol=1 / 255)
    steps = [999, 600, 300, 50]
    a = ours("a tiger", timesteps=steps, generator=seeded(), output_type="np").images
    b = theirs("a tiger", timesteps=steps, generator=seeded(), output_type="np").images
    _close(a, b, atol=1 / 255)
    assert ours.num_timesteps == 4


def test_step_callback_sees_and_replaces_tensors_and_can_interrupt(tiny_pipe):
    seen = []

    def record(pipe, i, t, tensors):
        seen.append((i, int(t), sorted(tensors), tensors["latents"].clone()))
        return tensors

    whole = tiny_pipe("a", num_inference_steps=4, generator=seeded(), output_type="latent",
                      callback_on_step_end=record, callback_on_step_end_tensor_inputs=tiny_pipe._callback_tensor_inputs)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][2] == sorted(tiny_pipe._callback_tensor_inputs)
    torch.testing.assert_close(seen[-1][3].to(whole.images.dtype), whole.images)

    def stop_after_one(pipe, i, t, tensors):
        if i == 1:
            pipe._interrupt = True
        return tensors

    stopped = tiny_pipe("a", num_inference_steps=4, generator=seeded(), output_type="latent",
                        callback_on_step_end=stop_after_one).images
    torch.testing.assert_close(stopped, seen[1][3].to(stopped.dtype))

    def zero_last(pipe, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if i == pipe.num_timesteps - 1 else tensors

    assert tiny_pipe("a", num_inference_steps=3, output_type="latent", callback_on_step_end=zero_last).images.abs().sum() == 0


def test_a_callback_may_raise_the_guidance_scale_step_by_step(tiny_pipe):
    def more(pipe, i, t, tensors):
        pipe._guidance_scale += 1.0
        return tensors

    tiny_pipe("a", guidance_scale=2.0, num_inference_steps=3, callback_on_step_end=more, output_type="latent")
    assert tiny_pipe.guidance_scale == 5.0 and tiny_pipe.do_classifier_free_guidance


def test_call_state_is_per_thread(tiny_pipe):
    """diffusers keeps a call's state on the pipeline; here each thread reads its own."""
    tiny_pipe("a", guidance_scale=3.0, num_inference_steps=2, output_type="latent")
    other = {}

    def run():
        tiny_pipe("a", guidance_scale=9.0, num_inference_steps=5, output_type="latent")
        other["scale"], other["steps"] = tiny_pipe.guidance_scale, tiny_pipe.num_timesteps

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert (tiny_pipe.guidance_scale, tiny_pipe.num_timesteps) == (3.0, 2) and other == {"scale": 9.0, "steps": 5}


def test_cross_attention_scale_scales_a_lora_as_diffusers_does(both, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ours, theirs = both
    torch.manual_seed(0)
    ours.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    with torch.no_grad():  # B starts at zero: give the LoRA an effect
        for name, weight in ours.unet.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 1.0)
    LatentDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ours.unet))
    theirs.load_lora_weights(tmp_path)
    run = lambda pipe, scale: pipe("a tiger", num_inference_steps=STEPS, generator=seeded(), output_type="np",  # noqa: E731
                                   cross_attention_kwargs={"scale": scale}).images
    _close(run(ours, 0.5), run(theirs, 0.5), atol=1 / 255)
    assert np.abs(run(ours, 0.0) - run(ours, 1.0)).max() > 0


def test_freeu_and_fused_qkv_match_diffusers(both):
    ours, theirs = both
    for pipe in both:
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    call = lambda pipe: pipe("a tiger", num_inference_steps=STEPS, generator=seeded(), output_type="np").images  # noqa: E731
    _close(call(ours), call(theirs), atol=1 / 255)
    _close(call(ours), call(ours), atol=0)  # twice: the second call replays a traced graph, with FreeU
    ours.disable_freeu()
    plain = call(ours)
    ours.fuse_qkv_projections()
    _close(call(ours), plain, atol=1e-5)
    ours.unfuse_qkv_projections()


def test_variants_dtype_dicts_and_components_we_do_not_have(tiny_pipe, tmp_path, caplog):
    from latentdiff import ModelFolderError

    tiny_pipe.save_pretrained(tmp_path / "v", variant="fp16")
    names = {p.name for p in (tmp_path / "v" / "unet").iterdir()}
    assert "diffusion_pytorch_model.fp16.safetensors" in names
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "v", variant="fp16", safety_checker=None,
                                                     requires_safety_checker=False,
                                                     torch_dtype={"unet": torch.bfloat16, "default": torch.float32})
    assert loaded.unet.dtype == torch.bfloat16 and loaded.vae.dtype == torch.float32
    tiny_pipe.save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelFolderError, match="variant=fp16"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "plain", variant="fp16")
    with pytest.raises(ValueError, match=r"torch_dtype names components this pipeline does not have: \['unte'\]"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "plain", torch_dtype={"unte": torch.float16})
    again = LatentDiffusionPipeline(**tiny_pipe.components)
    assert again.clip is tiny_pipe.clip and again.unet is tiny_pipe.unet
    assert {"safety_checker", "feature_extractor", "image_encoder"} <= set(tiny_pipe.components)
    LatentDiffusionPipeline(**{**tiny_pipe.components, "safety_checker": object()})
    assert "safety_checker is not a component of LatentDiffusionPipeline; it is ignored" in caplog.text


def test_a_unet_sample_size_given_as_a_tuple_sets_the_default_size(tiny_dir):
    from diffusers import UNet2DConditionModel

    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    config = dict(pipe.unet.config)
    config["sample_size"] = (16, 8)
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (16 * pipe.vae_scale_factor, 8 * pipe.vae_scale_factor, 3)


def test_a_unet_with_guidance_distilled_in_gets_the_scale_as_an_embedding_as_in_diffusers(tiny_pipe):
    from diffusers import LCMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**tiny_pipe.unet.config, "time_cond_proj_dim": 32})
    scheduler = LCMScheduler.from_config(tiny_pipe.scheduler.config)
    parts = dict(vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder, tokenizer=tiny_pipe.tokenizer, unet=unet,
                 scheduler=scheduler)
    ours = LatentDiffusionPipeline(**parts)
    theirs = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    rows = []
    hook = unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    a = ours("a tiger", num_inference_steps=2, guidance_scale=6.0, generator=seeded(), output_type="np").images
    hook.remove()
    b = theirs("a tiger", num_inference_steps=2, guidance_scale=6.0, generator=seeded(), output_type="np").images
    _close(a, b, atol=1 / 255)
    assert rows == [1, 1]  # one conditional pass per step: no unconditional one
    c = ours("a tiger", num_inference_steps=2, guidance_scale=2.0, generator=seeded(), output_type="np").images
    assert np.abs(a - c).max() > 0  # the scale reaches the U-Net
