"""What `latentdiff serve` costs over calling the pipeline: the same request in-process and over HTTP.

    python benchmarks/bench_serve.py [--steps 20] [--batch 1] [--repeats 10] [--clients 4]

In one process: the shipped model's pipeline as the server sets it up (compiled at a shape's first call), called
directly; the A1111 API (`POST /sdapi/v1/txt2img`) of a server on the same Engine, over real HTTP on 127.0.0.1,
one request at a time (latency: the PNG encoding, base64, JSON and HTTP on top); and `--clients` clients at once
(throughput: the queue keeps one request generating at a time). Medians of `--repeats`, interleaved, after warm-up.
Writes benchmarks/results/serve.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped emoji model)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    import uvicorn

    from latentdiff.serve import create_app
    from latentdiff.serve.engine import Engine

    engine = Engine(args.model)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, queue_size=args.clients), host="127.0.0.1", port=0,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/sdapi/v1/txt2img"
    request = {"prompt": "a tiger", "steps": args.steps, "cfg_scale": 7.5, "seed": 0, "batch_size": args.batch,
               "return_grid": False}

    def direct():
        engine.pipe("a tiger", num_inference_steps=args.steps, guidance_scale=7.5, num_images_per_prompt=args.batch,
                    generator=[torch.Generator().manual_seed(k) for k in range(args.batch)])

    def http():
        response = requests.post(url, json=request, timeout=600)
        response.raise_for_status()

    def concurrent():
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda _: http(), range(args.clients)))

    calls = {"pipeline": direct, "http": http, "concurrent": concurrent}
    times = {name: [] for name in calls}
    for _ in range(2):
        for fn in calls.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in calls.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    server.should_exit = True
    results = {name: summary(t) for name, t in times.items()}
    images = {"pipeline": args.batch, "http": args.batch, "concurrent": args.batch * args.clients}
    for name, r in results.items():
        r["images_per_s"] = images[name] / r["median_s"]
    overhead = results["http"]["median_s"] / results["pipeline"]["median_s"]
    report = {"machine": machine(), "model": engine.title, "steps": args.steps, "batch": args.batch,
              "clients": args.clients, "results": results, "http_over_pipeline": overhead,
              "command": " ".join(sys.argv)}
    table = ["| call | s per call (median, min–max) | img/s |", "|---|---|---|"]
    labels = {"pipeline": "pipeline, in-process", "http": "POST /sdapi/v1/txt2img, one client",
              "concurrent": f"POST /sdapi/v1/txt2img, {args.clients} clients at once"}
    for name, r in results.items():
        table.append(f"| {labels[name]} | {r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f}) "
                     f"| {r['images_per_s']:.2f} |")
    table.append(f"\nHTTP / in-process time: {overhead:.3f}x; {engine.title}, {args.steps} steps, batch "
                 f"{args.batch}, guidance 7.5, native size; {machine()}")
    write_report(Path(args.out), "serve", report, "\n".join(table))
    print("\n".join(table))
    return report


if __name__ == "__main__":
    main()
