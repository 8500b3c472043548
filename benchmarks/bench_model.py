"""Model-level benchmark: training throughput and inference latency, with fvcore params/FLOPs beside them
(the columns of the paper's Table II).

Training (images/s, paper preset, 224x224, batch 32 on CUDA): the fused ops (Triton kernels and the
extension) against the same model with every op on its reference backend (the official code's choices),
each in fp32 and with autocast (bf16 where supported, else fp16 with a grad scaler). Inference (ms/image,
eval-mode graph, text encoder included) at batch 1 and batch 32, fp16 autocast on CUDA.

    python benchmarks/bench_model.py --device cuda --out benchmarks/results/model_cuda.json
    python benchmarks/bench_model.py --device cpu --quick          # tiny preset, small batch: a smoke test
"""

from __future__ import annotations

import contextlib
import time

import torch

try:
    from benchmarks.common import measure, script_parser, write_rows
except ImportError:  # run as a script from benchmarks/
    from common import measure, script_parser, write_rows

from reclmis.config import RecLMISConfig
from reclmis.model import RecLMIS
from reclmis.model.tokenizer import NoteTokenizer
from reclmis.profiling import profile_model


def _model(preset: str, image_size: int, tokens: int, backend: str, device: str) -> RecLMIS:
    config = RecLMISConfig.preset(preset, image_size=image_size, max_text_len=tokens, ops_backend=backend)
    torch.manual_seed(0)
    model = RecLMIS(config, NoteTokenizer.placeholder(config.vocab_size, tokens)).to(device)
    return model.to(memory_format=torch.channels_last) if device == "cuda" else model


def _inputs(model: RecLMIS, batch: int, device: str) -> tuple[torch.Tensor, ...]:
    cfg = model.config
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)
    if device == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    ids = torch.randint(4, cfg.vocab_size, (batch, cfg.max_text_len), device=device)
    mask = torch.ones(batch, cfg.max_text_len, dtype=torch.bool, device=device)
    mask[::2, cfg.max_text_len // 2 :] = False  # half the notes padded
    masks = (torch.rand(batch, 1, cfg.image_size, cfg.image_size, device=device) > 0.8).float()
    return images, ids, mask, masks


def _autocast(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def training_throughput(preset, image_size, tokens, batch, device, backend, dtype, steps) -> dict:
    model = _model(preset, image_size, tokens, backend, device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device == "cuda")
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    images, ids, mask, masks = _inputs(model, batch, device)

    def step() -> None:
        with _autocast(device, dtype):
            loss = model(images, ids, mask, masks).losses["total"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    timing = measure(step, device, warmup=2, reps=steps)
    return {"images_per_s": batch / timing["median_ms"] * 1e3, **timing}


@torch.no_grad()
def inference_latency(preset, image_size, tokens, batch, device, dtype, reps) -> dict:
    model = _model(preset, image_size, tokens, "auto", device).eval()
    images, ids, mask, _ = _inputs(model, batch, device)

    def forward() -> None:
        with _autocast(device, dtype):
            model(images, ids, mask)

    timing = measure(forward, device, warmup=3, reps=reps)
    return {
        "ms_per_image": timing["median_ms"] / batch,
        "images_per_s": batch / timing["median_ms"] * 1e3,
        **timing,
    }


def run(device: str, quick: bool) -> list[dict]:
    if device == "cuda":
        preset, image_size, tokens, batch = "paper", 224, 18, 32
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        steps, reps = (5, 10) if quick else (10, 30)
    else:
        preset, image_size, tokens, batch = ("tiny", 64, 18, 4) if quick else ("paper", 224, 18, 2)
        amp, steps, reps = None, 3, 5
    rows: list[dict] = []
    shape = {"preset": preset, "image_size": image_size, "tokens": tokens}
    precisions = [("fp32", None)] + ([(str(amp).removeprefix("torch."), amp)] if amp is not None else [])
    for backend in ("auto", "reference"):
        for name, dtype in precisions:
            start = time.perf_counter()
            result = training_throughput(preset, image_size, tokens, batch, device, backend, dtype, steps)
            impl = "fused" if backend == "auto" else "reference"
            rows.append({"op": "model_training", "impl": impl, "pass": "train_step", "dtype": name,
                         "shape": shape | {"batch": batch}, **result,
                         "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    baseline = next(r for r in rows if r["impl"] == "reference" and r["dtype"] == "fp32")["images_per_s"]
    for row in rows:
        row["speedup_vs_reference_fp32"] = row["images_per_s"] / baseline
    infer_dtype = torch.float16 if device == "cuda" else None
    for infer_batch in (1, batch):
        result = inference_latency(preset, image_size, tokens, infer_batch, device, infer_dtype, reps)
        rows.append({"op": "model_inference", "impl": "eval_graph", "pass": "fwd",
                     "dtype": "fp16" if infer_dtype else "fp32", "shape": shape | {"batch": infer_batch},
                     **result})  # fmt: skip
    profile = profile_model(_model(preset, image_size, tokens, "reference", "cpu"), tokens, preset)
    rows.append({"op": "model_profile", "impl": "fvcore", "pass": "count", "shape": shape, **profile.to_dict(),
                 "params_training_m": profile.params_training_m})  # fmt: skip
    return rows


def main() -> None:
    args = script_parser(
        __doc__, "model", "fewer steps; on CPU the tiny preset at 64x64, batch 4 (a smoke test)"
    ).parse_args()
    print(write_rows("model", args.device, run(args.device, args.quick), args.out))


if __name__ == "__main__":
    main()
