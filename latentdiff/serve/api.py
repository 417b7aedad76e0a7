"""The HTTP side: AUTOMATIC1111's /sdapi/v1 routes (what its clients call) and the page, on FastAPI.

Request bodies are A1111's: the fields this server uses are checked (422 naming the field); fields it does not use
are accepted and ignored, as A1111 ignores what an extension it lacks would read; fields that would change the
image in a way this server cannot (hires fix, tiling, face restoration, variation seeds, scripts) are refused."""

from __future__ import annotations

import base64
import binascii
import hmac
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from .engine import MAX_SEED, Engine, RequestError
from .jobs import QueueFull, Worker
from .samplers import listing

MAX_IMAGES = 64  # batch_size: the images of one pipeline call
MAX_ITERATIONS = 100  # n_iter


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # A1111 clients send fields this server does not read

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)  # -1: a random seed
    width: Optional[int] = Field(None, ge=1, description="default: the model's native width")
    height: Optional[int] = Field(None, ge=1, description="default: the model's native height")
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=MAX_ITERATIONS)
    sampler_name: Optional[str] = Field(None, description="A1111's name; empty: the model's own")
    sampler_index: Optional[str] = Field(None, description="A1111's older field for sampler_name")
    scheduler: Optional[str] = Field(None, description="Automatic, Uniform, Karras or Exponential")
    eta: Optional[float] = Field(None, ge=0, le=1, description="DDIM's η")
    send_images: bool = True
    return_grid: Optional[bool] = Field(None, description="default: the server's option (A1111: true)")
    enable_hr: bool = False
    tiling: Optional[bool] = None
    restore_faces: Optional[bool] = None
    subseed_strength: float = 0.0
    script_name: Optional[str] = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(..., min_length=1, description="base64 images; the first is used")
    denoising_strength: float = Field(0.75, ge=0, le=1)
    mask: Optional[str] = Field(None, description="base64 image: white is repainted, black kept")
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    mask_blur: int = Field(0, ge=0, le=64)


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: Optional[str] = None
    return_grid: Optional[bool] = None


def create_app(engine: Engine, queue_size: int = 16, token: str | None = None,
               max_body_bytes: int = 32 * 2**20) -> FastAPI:
    """The server's ASGI app on a loaded Engine: A1111's API under /sdapi/v1 and the page at /."""
    app = FastAPI(title="latentdiff", version=engine.title, docs_url=None, redoc_url=None)  # the docs page needs a CDN
    worker = Worker(engine, queue_size)
    options = {"sd_model_checkpoint": engine.title, "return_grid": True, "samples_format": "png"}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        details = error.errors()
        messages = [f"{'.'.join(str(p) for p in d['loc'][1:]) or 'body'}: {d['msg']}"
                    + (f", got {d['input']!r}" if "input" in d and not isinstance(d["input"], (dict, list)) else "")
                    for d in details]
        return JSONResponse({"error": "invalid request", "message": "; ".join(messages),
                             "detail": [{k: d[k] for k in ("loc", "msg", "type")} for d in details]}, 422)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return JSONResponse({"error": "invalid request", "message": str(error),
                             "detail": [{"loc": ["body", error.field], "msg": str(error), "type": "value_error"}]},
                            422)

    async def generate(kind: str, body: Txt2ImgRequest, init_image=None, mask=None) -> dict:
        request = body.model_dump()
        if request["return_grid"] is None:
            request["return_grid"] = options["return_grid"]
        job = await run_in_threadpool(engine.check, kind, request, init_image, mask)  # decodes uploads
        try:
            future = worker.submit(job)
        except QueueFull as error:
            return JSONResponse({"error": "queue full", "message": str(error)}, 429, headers={"Retry-After": "5"})
        try:
            return await future
        except ValueError as error:  # what the pipeline refused: a field's value
            return JSONResponse({"error": "invalid request", "message": " ".join(str(error).split())}, 422)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest):
        return await generate("txt2img", body)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest):
        return await generate("img2img", body, body.init_images[0], body.mask)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        return worker.progress()

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        worker.skip()
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return listing(engine.max_few_steps > 0)

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        from .samplers import SCHEDULE_TYPES

        return [{"name": n.lower(), "label": n} for n in SCHEDULE_TYPES]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": engine.title, "model_name": engine.model_name, "hash": engine.hash[:10],
                 "sha256": engine.hash, "filename": str(engine.model_dir), "config": None}]

    @app.get("/sdapi/v1/options")
    async def get_options():
        return options

    @app.post("/sdapi/v1/options")
    async def set_options(body: Options):
        wanted = body.sd_model_checkpoint
        if wanted is not None and wanted not in (engine.title, engine.model_name):
            raise RequestError("sd_model_checkpoint", f"sd_model_checkpoint must be {engine.title!r}: this server "
                                                      f"serves one model (latentdiff serve --model), got {wanted!r}")
        if body.return_grid is not None:
            options["return_grid"] = body.return_grid
        return None

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/latentdiff/v1/model")
    async def model():
        """What the page needs to fill its form: the model's native size, sampler and few-step limit."""
        return {"title": engine.title, "name": engine.model_name, "width": engine.native_width,
                "height": engine.native_height, "multiple_of": engine.factor, "own_sampler": engine.own_sampler,
                "few_step_max_steps": engine.max_few_steps, "queue_size": queue_size}

    static = resources.files("latentdiff.serve") / "static"

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return Guard(app, token, max_body_bytes)


class Guard:
    """ASGI middleware: a token when one is set (Bearer, or HTTP Basic with the token as the password, which makes
    a browser ask for it), and request bodies of at most `max_body_bytes` (413)."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and not self._authorized(headers.get(b"authorization", b"")):
            return await _send_json(send, 401, {"error": "unauthorized", "message": "this server needs its token: "
                                    "Authorization: Bearer TOKEN, or HTTP Basic with the token as the password"},
                                    [(b"www-authenticate", b'Basic realm="latentdiff"')])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_json(send, 413, _too_large(self.max_body_bytes))
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # a body of unannounced length (chunked) is read here up to the limit, then handed on
            messages, seen = [], 0
            while True:
                message = await receive()
                messages.append(message)
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    return await _send_json(send, 413, _too_large(self.max_body_bytes))
                if message["type"] != "http.request" or not message.get("more_body"):
                    break

            async def replay():
                return messages.pop(0) if messages else await receive()

            return await self.app(scope, replay, send)
        await self.app(scope, receive, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, value = header.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        else:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())


def _too_large(limit: int) -> dict:
    return {"error": "request too large", "message": f"the request body must be at most {limit} bytes "
                                                     f"({limit / 2**20:.0f} MiB; latentdiff serve --max-upload-mb)"}


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
