"""IP-Adapter (Ye et al. 2023) as diffusers' StableDiffusionPipeline runs it: `pipe.load_ip_adapter(…)`, then
`ip_adapter_image=` or `ip_adapter_image_embeds=`; the same images as diffusers' pipeline on the same weights."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.embeddings import ImageProjection
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from latentdiff import LatentDiffusionImg2ImgPipeline, LatentDiffusionPipeline
from conftest import seeded

EMBED_DIM = 16  # the image encoder's projection width


def adapter_state_dict(unet, seed: int = 0) -> dict:
    """A random IP-Adapter in the layout of IP-Adapter checkpoints: `image_proj` (the image-embedding projection to
    4 extra tokens) and `ip_adapter` (a key and value projection per cross-attention layer, numbered 1, 3, 5 …)."""
    torch.manual_seed(seed)
    width = unet.config.cross_attention_dim
    projection = ImageProjection(cross_attention_dim=width, image_embed_dim=EMBED_DIM, num_image_text_embeds=4)
    p = projection.state_dict()
    image_proj = {"proj.weight": p["image_embeds.weight"], "proj.bias": p["image_embeds.bias"],
                  "norm.weight": p["norm.weight"], "norm.bias": p["norm.bias"]}
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            to_k = unet.get_submodule(name[: -len(".processor")]).to_k.weight
            layers[f"{key}.to_k_ip.weight"] = torch.randn_like(to_k) * 0.3
            layers[f"{key}.to_v_ip.weight"] = torch.randn_like(to_k) * 0.3
            key += 2
    return {"image_proj": image_proj, "ip_adapter": layers}


def image_encoder_parts():
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=EMBED_DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        image_size=32, patch_size=8)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return encoder, processor


def both_pipelines(tiny_pipe, with_encoder: bool = False):
    """Ours and diffusers' StableDiffusionPipeline on the same modules, each with the same IP-Adapter loaded."""
    encoder, processor = image_encoder_parts() if with_encoder else (None, None)
    parts = {k: tiny_pipe.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    ours = LatentDiffusionPipeline(**parts, image_encoder=encoder, feature_extractor=processor)
    state = adapter_state_dict(ours.unet)
    ours.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    theirs = StableDiffusionPipeline(**{**parts, "unet": ours.unet}, safety_checker=None, image_encoder=encoder,
                                     feature_extractor=processor, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def _images(pipe, **kwargs):
    return pipe("a red circle", num_inference_steps=3, generator=seeded(), output_type="np", **kwargs).images


def test_the_pipeline_is_an_ip_adapter_pipeline_as_diffusers_tests_require():
    import inspect

    from diffusers.loaders import IPAdapterMixin

    parameters = inspect.signature(LatentDiffusionPipeline.__call__).parameters
    assert issubclass(LatentDiffusionPipeline, IPAdapterMixin)
    assert {"ip_adapter_image", "ip_adapter_image_embeds"} <= set(parameters)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_image_embeds_give_the_image_diffusers_gives(tiny_pipe, guidance_scale):
    ours, theirs = both_pipelines(tiny_pipe)
    torch.manual_seed(1)
    embeds = torch.randn(1, 1, EMBED_DIM)
    if guidance_scale > 1:  # with guidance: the negative rows, then the positive ones, as in diffusers
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
    ours.set_ip_adapter_scale(0.8)
    a = _images(ours, guidance_scale=guidance_scale, ip_adapter_image_embeds=[embeds])
    b = _images(theirs, guidance_scale=guidance_scale, ip_adapter_image_embeds=[embeds])
    np.testing.assert_allclose(a, b, atol=1e-5)
    ours.set_ip_adapter_scale(0.0)  # scale 0: the adapter adds nothing
    off = _images(ours, guidance_scale=guidance_scale, ip_adapter_image_embeds=[embeds])
    ours.unload_ip_adapter()
    np.testing.assert_allclose(off, _images(ours, guidance_scale=guidance_scale), atol=1e-5)
    assert np.abs(a - off).max() > 1e-2  # and scale 0.8 changed the image


def test_an_image_goes_through_the_image_encoder_as_in_diffusers(tiny_pipe):
    ours, theirs = both_pipelines(tiny_pipe, with_encoder=True)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    a = _images(ours, ip_adapter_image=picture, num_images_per_prompt=2)
    b = _images(theirs, ip_adapter_image=picture, num_images_per_prompt=2)
    assert a.shape == (2, *a.shape[1:])
    np.testing.assert_allclose(a, b, atol=1e-5)
    # img2img takes the IP-Adapter arguments too (its __call__ is the text-to-image one's)
    i2i = LatentDiffusionImg2ImgPipeline.from_pipe(ours)
    i2i("a red circle", image=Image.new("RGB", (32, 32), "red"), num_inference_steps=3, ip_adapter_image=picture,
        output_type="np")


def test_image_encoder_and_feature_extractor_are_saved_and_loaded_by_both_libraries(tiny_pipe, tmp_path):
    encoder, processor = image_encoder_parts()
    pipe = LatentDiffusionPipeline(**{**tiny_pipe.components, "image_encoder": encoder,
                                      "feature_extractor": processor})
    pipe.save_pretrained(tmp_path / "m")
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.image_encoder, CLIPVisionModelWithProjection)
    assert loaded.feature_extractor.crop_size == {"height": 32, "width": 32}
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "m", safety_checker=None)
    assert isinstance(theirs.image_encoder, CLIPVisionModelWithProjection)
    torch.testing.assert_close(theirs.image_encoder.visual_projection.weight, encoder.visual_projection.weight)
    # saved again without them: the folders go, and model_index.json says so
    LatentDiffusionPipeline(**tiny_pipe.components).save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "image_encoder").exists()
    assert LatentDiffusionPipeline.from_pretrained(tmp_path / "m").image_encoder is None


def test_ip_adapter_arguments_are_checked(tiny_pipe):
    embeds = [torch.zeros(2, 1, EMBED_DIM)]
    with pytest.raises(ValueError, match="ip_adapter_image_embeds needs an IP-Adapter: load one with pipe.load_ip_adapter"):
        _images(tiny_pipe, ip_adapter_image_embeds=embeds)
    ours, _ = both_pipelines(tiny_pipe)
    with pytest.raises(ValueError, match="pass ip_adapter_image or ip_adapter_image_embeds, not both"):
        _images(ours, ip_adapter_image=Image.new("RGB", (8, 8)), ip_adapter_image_embeds=embeds)
    with pytest.raises(TypeError, match=r"ip_adapter_image_embeds must be a list of 3-D or 4-D tensors \(one per "
                                        r"IP-Adapter\), got Tensor"):
        _images(ours, ip_adapter_image_embeds=embeds[0])
    with pytest.raises(ValueError, match="an IP-Adapter is loaded: pass ip_adapter_image or ip_adapter_image_embeds"):
        _images(ours)
    with pytest.raises(ValueError, match="ip_adapter_image needs an image encoder"):
        _images(ours, ip_adapter_image=Image.new("RGB", (8, 8)))
