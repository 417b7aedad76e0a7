"""`latentdiff serve`: AUTOMATIC1111's API against a running server (real HTTP, the tiny model), its queue,
interrupts, errors and token, an A1111 client library unchanged, and the page in headless Chromium."""

import base64
import io
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from latentdiff.serve import check_host, create_app  # noqa: E402
from latentdiff.serve.engine import Engine  # noqa: E402

from conftest import seeded  # noqa: E402


class Server:
    """An app served by uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, path, body, **kwargs):
        return requests.post(self.url + path, json=body, timeout=120, **kwargs)

    def get(self, path, **kwargs):
        return requests.get(self.url + path, timeout=30, **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(str(tiny_dir))


@pytest.fixture(scope="module")
def server(engine):
    served = Server(create_app(engine, queue_size=8))
    yield served
    served.stop()


def decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_base64(image, format="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode()


TINY = {"prompt": "a red circle", "steps": 4, "cfg_scale": 7.5, "seed": 7}


def test_txt2img_answers_a1111s_fields_with_pngs_that_carry_their_parameters(server, tiny_pipe):
    response = server.post("/sdapi/v1/txt2img", {**TINY, "negative_prompt": "blue", "unknown_field": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7] and info["sampler_name"] == "DDIM"
    assert info["width"] == info["height"] == 32 and info["sd_model_name"] == "tiny"
    assert body["parameters"]["prompt"] == "a red circle" and body["parameters"]["width"] == 32
    image = decode(body["images"][0])
    assert image.size == (32, 32)
    assert image.info["parameters"] == info["infotexts"][0]
    assert "Negative prompt: blue" in image.info["parameters"] and "Sampler: DDIM" in image.info["parameters"]
    # the image the pipeline makes itself from that seed
    tiny_pipe.use_tracing = False
    alone = tiny_pipe("a red circle", num_inference_steps=4, guidance_scale=7.5, negative_prompt="blue",
                      generator=[seeded(7)], output_type="np").images[0]
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), (alone * 255).round().astype(np.uint8))


def test_concurrent_requests_each_get_exactly_the_bytes_they_get_alone(server):
    requests_ = [{**TINY, "seed": s, "steps": 3 + s % 3, "batch_size": 1 + s % 2,
                  "sampler_name": ["Euler a", "DPM++ 2M Karras", None][s % 3]} for s in range(6)]
    alone = [server.post("/sdapi/v1/txt2img", r).json()["images"] for r in requests_]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda r: server.post("/sdapi/v1/txt2img", r), requests_))
    assert all(r.status_code == 200 for r in together)
    assert [r.json()["images"] for r in together] == alone
    assert len({a[-1] for a in alone}) == len(alone)  # six different images, not one repeated


def test_a_batch_of_iterations_has_a1111s_seeds_and_grid(server):
    body = server.post("/sdapi/v1/txt2img", {**TINY, "batch_size": 2, "n_iter": 2, "seed": 100}).json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [100, 101, 102, 103] and info["index_of_first_image"] == 1
    from latentdiff.images import image_grid

    images = [decode(b).convert("RGB") for b in body["images"]]
    assert len(images) == 5 and np.array_equal(np.asarray(images[0]), np.asarray(image_grid(images[1:])))
    one = server.post("/sdapi/v1/txt2img", {**TINY, "seed": 102}).json()
    assert decode(one["images"][0]).info["parameters"] == info["infotexts"][2]
    random_seed = json.loads(server.post("/sdapi/v1/txt2img", {**TINY, "seed": -1}).json()["info"])["seed"]
    assert 0 <= random_seed < 2**32


@pytest.mark.parametrize("change, field", [
    ({"steps": 0}, "steps"), ({"width": 33}, "width"), ({"height": 1024}, "height"), ({"seed": -2}, "seed"),
    ({"sampler_name": "DPM++ 7M"}, "sampler_name"), ({"sampler_name": "LCM"}, "sampler_name"),
    ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler"), ({"enable_hr": True}, "enable_hr"),
    ({"batch_size": 65}, "batch_size"), ({"cfg_scale": "strong"}, "cfg_scale"), ({"steps": 1001}, "steps"),
])
def test_bad_input_is_422_naming_the_field(server, change, field):
    response = server.post("/sdapi/v1/txt2img", {**TINY, **change})
    assert response.status_code == 422, response.text
    body = response.json()
    assert field in body["message"] and body["detail"][0]["loc"][-1] == field


def test_img2img_and_inpainting_take_uploads_and_refuse_unsafe_ones(server, tiny_dir):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    mask = Image.new("L", (40, 48))
    mask.paste(255, (0, 0, 20, 48))
    request = {**TINY, "init_images": [png_base64(init)], "denoising_strength": 0.5}
    img2img = server.post("/sdapi/v1/img2img", request)
    assert img2img.status_code == 200, img2img.text
    assert decode(img2img.json()["images"][0]).size == (32, 32)
    assert json.loads(img2img.json()["info"])["denoising_strength"] == 0.5
    inpainted = server.post("/sdapi/v1/img2img", {**request, "width": 40, "height": 48, "denoising_strength": 1.0,
                                                   "mask": "data:image/png;base64," + png_base64(mask)})
    assert inpainted.status_code == 200, inpainted.text
    from latentdiff.pipelines.image_to_image import LatentDiffusionInpaintPipeline

    pipe = LatentDiffusionInpaintPipeline.from_pretrained(tiny_dir)  # what the pipeline makes of it, alone
    pipe.set_progress_bar_config(disable=True)
    alone = pipe("a red circle", image=init, mask_image=mask, strength=1.0, num_inference_steps=4,
                 guidance_scale=7.5, width=40, height=48, generator=[seeded(7)], output_type="np").images[0]
    out = np.asarray(decode(inpainted.json()["images"][0]).convert("RGB"))
    np.testing.assert_array_equal(out, (alone * 255).round().astype(np.uint8))
    for upload, words in (("not base64!", "base64"), (png_base64(init, "GIF"), "PNG, JPEG, WEBP"),
                          (png_base64(Image.new("L", (5000, 4000))), "at most")):
        response = server.post("/sdapi/v1/img2img", {**request, "init_images": [upload]})
        assert response.status_code == 422 and "init_images[0]" in response.json()["message"], response.text
        assert words in response.json()["message"]
    assert server.post("/sdapi/v1/img2img", TINY).status_code == 422  # no init_images


def test_a_full_queue_answers_429_and_an_interrupt_ends_the_running_job_with_its_images(engine):
    server = Server(create_app(engine, queue_size=1))
    try:
        long = {**TINY, "steps": 1000, "n_iter": 50, "sampler_name": "DDPM"}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(server.post, "/sdapi/v1/txt2img", long)
            deadline = time.time() + 60
            while server.get("/sdapi/v1/progress").json()["state"]["sampling_step"] == 0:
                assert time.time() < deadline and not running.done(), "the job did not start"
                time.sleep(0.05)
            waiting = pool.submit(server.post, "/sdapi/v1/txt2img", TINY)
            while server.get("/sdapi/v1/progress").json()["queued"] == 0:
                assert time.time() < deadline, "the second request was not queued"
                time.sleep(0.05)
            full = server.post("/sdapi/v1/txt2img", TINY)
            assert full.status_code == 429 and "queue is full" in full.json()["message"]
            progress = server.get("/sdapi/v1/progress").json()
            assert 0 < progress["progress"] < 1 and progress["state"]["job_count"] == 50
            assert progress["state"]["sampling_steps"] == 1000 and progress["eta_relative"] > 0
            assert server.post("/sdapi/v1/interrupt", {}).status_code == 200
            answer = running.result(timeout=60)
            assert answer.status_code == 200
            info = json.loads(answer.json()["info"])
            assert info["interrupted"] and len(info["all_seeds"]) < 50
            assert waiting.result(timeout=60).status_code == 200  # the queue goes on
    finally:
        server.stop()


def test_a_token_guards_every_route_bearer_or_basic(engine):
    server = Server(create_app(engine, token="s3cret"))
    try:
        refused = server.get("/sdapi/v1/sd-models")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")
        assert server.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert server.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert server.get("/sdapi/v1/sd-models", auth=("anyone", "s3cret")).status_code == 200
        assert server.get("/sdapi/v1/sd-models", auth=("anyone", "s3cre")).status_code == 401
        webuiapi = pytest.importorskip("webuiapi")  # A1111 clients pass it as the --api-auth password
        api = webuiapi.WebUIApi(port=server.port, username="me", password="s3cret")
        assert api.get_sd_models()[0]["model_name"] == "tiny"
    finally:
        server.stop()


def test_a_body_over_the_limit_is_413(engine):
    server = Server(create_app(engine, max_body_bytes=10_000))
    try:
        big = {**TINY, "init_images": ["A" * 20_000]}
        assert server.post("/sdapi/v1/img2img", big).status_code == 413
        chunked = requests.post(server.url + "/sdapi/v1/img2img", data=iter([json.dumps(big).encode()]),
                                headers={"Content-Type": "application/json"}, timeout=30)  # no Content-Length
        assert chunked.status_code == 413
        assert server.post("/sdapi/v1/txt2img", TINY).status_code == 200
    finally:
        server.stop()


def test_listening_beyond_this_machine_needs_allow_remote(capsys):
    from latentdiff.cli import main

    check_host("127.0.0.1", False), check_host("::1", False), check_host("localhost", False)
    check_host("0.0.0.0", True)
    with pytest.raises(ValueError, match="--allow-remote"):
        check_host("0.0.0.0", False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2  # refused before any model loads
    assert "--allow-remote" in capsys.readouterr().err


def test_an_a1111_client_library_works_unchanged(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(port=server.port)
    result = api.txt2img(prompt="a blue square", seed=11, steps=4, width=32, height=32, sampler_name="Euler")
    assert result.image.size == (32, 32) and result.info["all_seeds"] == [11]
    assert "Sampler: Euler," in result.image.info["parameters"]
    again = api.img2img(images=[result.image], prompt="a blue square", seed=11, steps=4, width=32, height=32,
                        denoising_strength=0.6, sampler_name="Euler")
    assert again.image.size == (32, 32)
    assert [m["model_name"] for m in api.get_sd_models()] == ["tiny"]
    assert "Euler a" in [s["name"] for s in api.get_samplers()]
    assert "progress" in api.get_progress()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_generates_images_in_a_real_browser(server):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing; README's test command installs it (tools/system-deps.sh)")
        pytest.skip("needs Debian's chromium (tools/system-deps.sh installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url)
            page.wait_for_function("document.querySelector('#sampler_name').options.length > 1")
            page.fill("#prompt", "two red circles")
            page.fill("#steps", "3")
            page.fill("#batch_size", "2")
            page.fill("#seed", "5")
            page.click("#generate")
            images = page.locator("#gallery figure img")
            images.nth(1).wait_for()
            assert images.count() == 2 and not errors
            assert page.eval_on_selector("#gallery figure img", "img => img.naturalWidth") == 32
            link = page.locator("#gallery figure a").first
            assert link.get_attribute("download") == "latentdiff-5.png"
            png = decode(link.get_attribute("href").partition(",")[2])
            assert "Seed: 5," in png.info["parameters"] and "two red circles" in png.info["parameters"]
            page.fill("#steps", "0")  # the server's 422 reaches the page
            page.evaluate("document.querySelector('#steps').removeAttribute('min')")
            page.click("#generate")
            page.locator("#error").wait_for()
            assert "steps" in page.inner_text("#error")
        finally:
            browser.close()


def test_the_pipeline_behind_a_sampler_shares_the_models_networks(engine):
    from latentdiff.serve.samplers import resolve

    euler = engine.pipeline("img2img", resolve("Euler"))
    assert euler.unet is engine.pipe.unet and euler._traced_unet is engine.pipe._traced_unet
    assert type(euler.scheduler).__name__ == "EulerDiscreteScheduler" and not euler.use_few_step
    assert engine.pipeline("img2img", resolve("euler")) is euler
