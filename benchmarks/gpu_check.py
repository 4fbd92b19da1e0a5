"""The GPU path, checked in a few minutes: Ray Train fine-tunes the embedder on the GPU (``training.use_gpu``,
nccl) and Ray Serve serves it with ``serve.num_gpus`` per model replica; the same work runs on the CPU beside it.

Prepared for a machine with a GPU (run it there as one short script). Both sides: the packaged MiniLM, the same
synthesised env pairs (from the test fixtures' trajectories, no ScienceWorld needed), one epoch, the same global
batch; then the service on the trained model, its env KB fed with a fixture episode's observations, and
``/v1/retrieve`` timed one request at a time. Reported per side: training samples/s (steps after the first) and
retrieve p50/p99; the GPU/CPU ratios. Without a GPU it says so and exits 3, unless ``--cpu-only`` (what the
tests of this script can run anywhere). Writes ``benchmarks/results/gpu_check.json``.

    .venv/bin/python benchmarks/gpu_check.py [--pairs 2048] [--requests 200] [--cpu-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lib.fixture_pairs import fixture_pairs  # noqa: E402
from lib.results import write_result  # noqa: E402
from lib.service import FIXTURES, free_port, pct  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"


def side(device: str, pairs: list, requests: int, tmp: Path) -> dict[str, Any]:
    """Train on ``device`` ("cpu" or "gpu"), serve the result there, time retrieves; returns the numbers."""
    import ray
    from ray import serve

    from knowmap.actors.experience import release_experience_kb
    from knowmap.config import KnowMapConfig
    from knowmap.models.embedder import default_embedder_path
    from knowmap.serve.app import start_service
    from knowmap.serve.client import KnowMapClient
    from knowmap.train.embedder_trainer import train_embedder

    gpu = device == "gpu"
    cores = os.cpu_count() or 2
    config = KnowMapConfig(
        data_dir=tmp / device, ray={"namespace": f"gpu-check-{device}"},
        training={"epochs": 1, "batch_size": 64, "use_gpu": gpu, "backend": "nccl" if gpu else "gloo",
                  "num_workers": 1 if gpu else min(2, cores), "cpus_per_worker": 1.0,
                  "finetuned_weight": 1.0, "select_variations": 0},
        serve={"port": free_port(), "num_gpus": 0.5 if gpu else 0.0, "ingress_num_cpus": 0.5,
               "reranker_num_cpus": 0.25})
    ray.init(num_cpus=max(2, cores), num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False,
             namespace=config.ray.namespace)
    try:
        trained = train_embedder(pairs, base_model=default_embedder_path(), output_dir=str(tmp / device / "model"),
                                 config=config.training)
        epoch = trained.history[-1]
        info = start_service(config, embedder=trained.model_dir, reranker="")
        client = KnowMapClient(info.url, info.api_key, timeout_s=120)
        records = json.loads((FIXTURES / "observations.json").read_text())["records"]
        client.add_observations("gpu-check-env", [{k: r[k] for k in ("step", "action", "text", "look", "inventory")}
                                                  for r in records if r["task"] == "boil" and r["variation"] == 0])
        for _ in range(5):  # warm-up
            client.retrieve("where is the thermometer", env_id="gpu-check-env", kbs=["env"], k=5)
        latencies = []
        for i in range(requests):
            started = time.perf_counter()
            client.retrieve(f"find the thermometer and the metal pot {i}", env_id="gpu-check-env", k=5)
            latencies.append((time.perf_counter() - started) * 1000)
        client.close()
        return {"device": device, "train_samples_per_s": epoch.get("samples_per_s"), "train_seconds":
                epoch.get("seconds"), "retrieve_p50_ms": pct(latencies, 50), "retrieve_p99_ms": pct(latencies, 99),
                "requests": requests, "pairs": len(pairs)}
    finally:
        serve.shutdown()
        release_experience_kb(config)
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2048, help="training pairs (the fixtures' pairs, repeated)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--cpu-only", action="store_true", help="run the CPU side alone (no GPU needed)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    import torch

    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.cpu_only:
        print("no CUDA device here: nothing to check (run with --cpu-only to exercise the script on the CPU)")
        return 3
    base = fixture_pairs(FIXTURES / "trajectories")
    pairs = [base[i % len(base)] for i in range(args.pairs)]
    tmp = Path(tempfile.mkdtemp(prefix="knowmap-gpu-check-"))
    started = time.perf_counter()
    sides = {"cpu": side("cpu", pairs, args.requests, tmp)}
    if has_gpu and not args.cpu_only:
        sides["gpu"] = side("gpu", pairs, args.requests, tmp)
    for name, row in sides.items():
        print(f"{name}: training {row['train_samples_per_s']:.1f} samples/s; retrieve p50 "
              f"{row['retrieve_p50_ms']:.1f} ms, p99 {row['retrieve_p99_ms']:.1f} ms")
    ratios = {}
    if "gpu" in sides:
        cpu, gpu = sides["cpu"], sides["gpu"]
        ratios = {"train_samples_per_s_gpu_over_cpu": gpu["train_samples_per_s"] / cpu["train_samples_per_s"],
                  "retrieve_p50_cpu_over_gpu": cpu["retrieve_p50_ms"] / gpu["retrieve_p50_ms"]}
        print(f"baseline (CPU) {cpu['train_samples_per_s']:.1f} samples/s; result (GPU) "
              f"{gpu['train_samples_per_s']:.1f}; ratio {ratios['train_samples_per_s_gpu_over_cpu']:.2f}")
    result = {"metric": "train_samples_per_s_gpu_over_cpu", "value": ratios.get("train_samples_per_s_gpu_over_cpu"),
              "goal": "the GPU path runs end to end (train with nccl, serve with num_gpus)",
              "details": {"sides": sides, "ratios": ratios, "cpus": os.cpu_count(),
                          "gpu": torch.cuda.get_device_name(0) if has_gpu else None,
                          "seconds": time.perf_counter() - started}}
    write_result(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
