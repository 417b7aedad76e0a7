"""OpenVINO as the compiled backend: from the third call on, images within one level of 255 of eager calls, a disk
cache that spares the conversion, weights changed in place seen, a trace where OpenVINO fails."""

import threading

import numpy as np
import pytest
import torch

from latentdiff.pipelines import openvino

from conftest import seeded
from test_tracing import STEPS, eager, run  # the same two-prompt call, compiled and eager

pytestmark = pytest.mark.skipif(not openvino.available(), reason="openvino is not installed")


def graph_types(pipe) -> set:
    return {type(g).__name__ for call in (pipe._traced_unet, pipe._traced_decoder) for g in call._graphs.values()}


@pytest.fixture
def ov_pipe(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    tiny_pipe.compile_backend = "openvino"
    return tiny_pipe


def test_from_the_third_call_on_the_networks_run_in_openvino_within_one_level_of_255(ov_pipe):
    first = run(ov_pipe)
    assert graph_types(ov_pipe) == set()  # a one-off call compiles nothing
    second = run(ov_pipe)  # compiles, then runs the compiled networks
    assert graph_types(ov_pipe) == {"OpenVINOGraph"}
    third = run(ov_pipe)
    np.testing.assert_array_equal(second, third)
    assert np.abs(third - first).max() < 1 / 255 and np.abs(third - eager(ov_pipe)).max() < 1 / 255
    guided_once = run(ov_pipe, guidance_scale=1.0)  # another batch shape: eager first, then its own graph
    np.testing.assert_allclose(run(ov_pipe, guidance_scale=1.0), guided_once, atol=1 / 255)


def test_compile_first_call_runs_every_call_of_a_shape_in_the_same_network(ov_pipe):
    ov_pipe.compile_first_call = True  # what `latentdiff serve` sets: a request's bytes never depend on its turn
    first = run(ov_pipe)
    assert graph_types(ov_pipe) == {"OpenVINOGraph"}
    np.testing.assert_array_equal(run(ov_pipe), first)


def test_a_pipeline_from_pipe_shares_the_compiled_networks_and_few_step_weights(ov_pipe, monkeypatch):
    from diffusers import EulerDiscreteScheduler

    from latentdiff.pipelines.image_to_image import LatentDiffusionImg2ImgPipeline

    run(ov_pipe), run(ov_pipe)
    ov_pipe.few_step = object()  # stands for the model's few-step weights
    euler = EulerDiscreteScheduler.from_config(ov_pipe.scheduler.config)
    img2img = LatentDiffusionImg2ImgPipeline.from_pipe(ov_pipe, scheduler=euler)
    assert img2img.scheduler is euler and type(ov_pipe.scheduler).__name__ != "EulerDiscreteScheduler"
    assert img2img._traced_unet is ov_pipe._traced_unet and img2img.few_step is ov_pipe.few_step
    assert img2img.compile_backend == "openvino" and img2img._traced_decoder is ov_pipe._traced_decoder
    ov_pipe.few_step = None
    euler_pipe = type(ov_pipe).from_pipe(ov_pipe, scheduler=euler)
    euler_pipe.set_progress_bar_config(disable=True)
    compiled = []
    monkeypatch.setattr(openvino, "compile_graph", lambda module, *a, **k: compiled.append(type(module).__name__))
    run(euler_pipe), run(euler_pipe)  # another sampler; the decoder's input is the same: ov_pipe's network
    assert "AutoencoderKL" not in compiled and "CLIPTextModel" not in compiled


def test_a_converted_network_is_read_back_from_the_disk_cache(ov_pipe, tiny_dir, tmp_path, monkeypatch):
    run(ov_pipe), run(ov_pipe)
    assert len(list((tmp_path / "cache" / "openvino").glob("*/model.xml"))) == 3  # text encoder, U-Net, decoder

    def no_conversion(*args):
        raise AssertionError("converted again, not read from the cache")

    monkeypatch.setattr(openvino, "_convert", no_conversion)
    from latentdiff import LatentDiffusionPipeline

    again = LatentDiffusionPipeline.from_pretrained(tiny_dir)  # another pipeline, the same weights
    again.set_progress_bar_config(disable=True)
    again.compile_backend = "openvino"
    run(again), run(again)
    assert graph_types(again) == {"OpenVINOGraph"}


def test_weights_changed_in_place_get_a_new_network(ov_pipe):
    run(ov_pipe), run(ov_pipe)
    before = run(ov_pipe)
    with torch.no_grad():
        for p in ov_pipe.unet.parameters():
            p.mul_(1.5)
    after = run(ov_pipe), run(ov_pipe)  # eager, then a network compiled with the new weights
    assert np.abs(after[1] - before).max() > 1e-3
    np.testing.assert_allclose(after[1], eager(ov_pipe), atol=1 / 255)


def test_bf16_networks_run_in_openvino_at_bf16(ov_pipe):
    ov_pipe.to(dtype=torch.bfloat16)
    eager_bf16 = eager(ov_pipe)
    run(ov_pipe)
    compiled = run(ov_pipe)
    assert graph_types(ov_pipe) == {"OpenVINOGraph"}
    assert np.abs(compiled - eager_bf16).mean() < 0.02  # bf16 kernels differ; the images must not


def test_a_failed_conversion_falls_back_to_a_torch_trace_with_a_warning(ov_pipe, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(openvino, "_convert", broken)
    first = run(ov_pipe)
    np.testing.assert_array_equal(run(ov_pipe), first)  # a trace: bit for bit
    assert graph_types(ov_pipe) == {"TopLevelTracedModule"}
    assert "OpenVINO could not compile UNet2DConditionModel" in caplog.text and "unsupported operation" in caplog.text


def test_threads_sharing_a_compiled_pipeline_get_their_own_images(ov_pipe):
    for _ in range(2):  # the one-prompt shapes compiled
        ov_pipe("a tiger", num_inference_steps=STEPS, generator=seeded(9), output_type="np")
    assert graph_types(ov_pipe) == {"OpenVINOGraph"}
    alone = {seed: ov_pipe("a tiger", num_inference_steps=STEPS, generator=seeded(seed), output_type="np").images
             for seed in range(4)}
    together = {}

    def work(seed):
        together[seed] = ov_pipe("a tiger", num_inference_steps=STEPS, generator=seeded(seed),
                                 output_type="np").images

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in range(4):
        np.testing.assert_array_equal(together[seed], alone[seed])
