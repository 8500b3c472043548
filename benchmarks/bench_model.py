"""Model-level benchmark: training throughput and inference latency, with fvcore params/FLOPs beside them
(the columns of the paper's Table II).

Training (images/s, paper preset, 224x224, batch 32 on CUDA): the fused ops (Triton kernels and the
extension) against the same model with every op on its reference backend (the official code's choices),
each in fp32 and with autocast (bf16 where supported, else fp16 with a grad scaler). Inference (ms/image,
eval-mode graph, text encoder included) at batch 1 and batch 32, fp16 autocast on CUDA.

With ``--compile``: eager and torch.compile side by side, in the same process, in alternating rounds (a
change in the machine's load hits both alike). On CUDA the fused model of the training rows compiled with
"reduce-overhead" (CUDA graphs, what ``train.compile`` picks on one GPU), training in fp32 and autocast
beside the reference row, and inference at batch 1; on CPU the small preset at 224x224, batch 4, in
inductor's default mode (--quick: the tiny preset at 64x64). Each variant's first call (for the compiled
one: tracing and code generation, forward and backward) is timed on its own as first_call_s; the warm-up
calls that follow (CUDA graph recording) are not timed. ``--parts train`` / ``--parts inference`` measure one
of the two; ``--session`` takes the GPU session's repetitions and precisions (see compile_comparison).

    python3 benchmarks/bench_model.py --device cuda --out benchmarks/results/model_cuda.json
    python3 benchmarks/bench_model.py --device cpu --compile --out benchmarks/results/model_compile_cpu.json
    python3 benchmarks/bench_model.py --device cpu --quick          # tiny preset, small batch: a smoke test
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

try:
    from benchmarks.common import alternating_rounds, measure, script_parser, write_rows
except ImportError:  # run as a script from benchmarks/
    from common import alternating_rounds, measure, script_parser, write_rows

from reclmis.config import RecLMISConfig
from reclmis.model import RecLMIS
from reclmis.model.tokenizer import NoteTokenizer
from reclmis.profiling import profile_model
from reclmis.train.compilation import resolve_compile_mode

PARTS = ("train", "inference")


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


def _training_step(model: RecLMIS, net: Callable, batch: int, device: str, dtype, compiled: bool):
    """One optimisation step of ``net`` (the model or its compiled wrapper), as the trainer runs it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device == "cuda")
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    images, ids, mask, masks = _inputs(model, batch, device)

    def step() -> None:
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        with _autocast(device, dtype):
            loss = net(images, ids, mask, masks).losses["total"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def training_throughput(preset, image_size, tokens, batch, device, backend, dtype, steps) -> dict:
    model = _model(preset, image_size, tokens, backend, device).train()
    step = _training_step(model, model, batch, device, dtype, compiled=False)
    timing = measure(step, device, warmup=2, reps=steps)
    return {"images_per_s": batch / timing["median_ms"] * 1e3, **timing}


def _first_call_seconds(fn: Callable[[], None], device: str) -> float:
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compiled_side_by_side(
    runs: dict[str, Callable[[], None]], device: str, reps: int, rounds: int = 3
) -> dict[str, dict]:
    """Median time of each callable over ``rounds`` alternating rounds of ``reps`` calls (so that a change
    in the machine's load hits every variant alike), after its first (compiling) call and two warm-up calls
    (CUDA graphs are recorded there). min_ms, the fastest call, is the figure least disturbed by other load."""
    first = {}
    for name, fn in runs.items():
        first[name] = _first_call_seconds(fn, device)
        print(f"{name}: first call (compilation for the compiled ones) {first[name]:.1f} s", flush=True)
    for fn in runs.values():
        fn()
        fn()
    timings = alternating_rounds(runs, device, reps, rounds)
    return {name: timing | {"first_call_s": first[name]} for name, timing in timings.items()}


def compile_comparison(
    device: str, quick: bool, *, session: bool = False, parts: tuple[str, ...] = PARTS
) -> list[dict]:
    """Training steps (and, on CUDA, batch-1 inference) eager and compiled, side by side; on CUDA also the
    reference row (fp32, reference ops, eager: the official configuration) that the GPU goal divides by.

    ``parts``: "train", "inference" or both. ``session`` (the GPU session, benchmarks/gpu_session.sh): two
    rounds, and the compiled training step in the autocast precision only (fp32 runs eager, beside the
    reference row), since each compiled precision costs a compilation of the forward and backward."""
    if device == "cuda":
        preset, image_size, tokens, batch = "paper", 224, 18, 32
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        precisions = [("fp32", None), (str(amp).removeprefix("torch."), amp)]
        reps, rounds = (5, 2) if quick else ((10, 2) if session else (10, 3))
    else:
        preset, image_size, tokens, batch = ("tiny", 64, 18, 4) if quick else ("small", 224, 18, 4)
        precisions, reps, rounds = [("fp32", None)], (2 if quick else 4), (2 if quick else 3)
    mode = resolve_compile_mode("auto", torch.device(device), distributed=False)
    shape = {"preset": preset, "image_size": image_size, "tokens": tokens, "batch": batch}
    rows: list[dict] = []
    for name, dtype in precisions if "train" in parts else []:
        model = _model(preset, image_size, tokens, "auto", device).train()
        runs = {"fused_eager": _training_step(model, model, batch, device, dtype, compiled=False)}
        if not (session and dtype is None and len(precisions) > 1):
            compiled = torch.compile(model, mode=mode)
            runs["fused_compiled"] = _training_step(model, compiled, batch, device, dtype, True)
        if device == "cuda" and dtype is None:
            reference = _model(preset, image_size, tokens, "reference", device).train()
            runs["reference_eager"] = _training_step(reference, reference, batch, device, None, False)
        results = compiled_side_by_side(runs, device, reps, rounds)
        for impl, result in results.items():
            rows.append({"op": "model_training", "impl": impl, "pass": "train_step", "dtype": name, "shape": shape,
                         "compile_mode": mode if impl.endswith("compiled") else None,
                         "images_per_s": batch / result["median_ms"] * 1e3, **result,
                         "speedup_vs_eager": results["fused_eager"]["median_ms"] / result["median_ms"],
                         "speedup_vs_eager_min": results["fused_eager"]["min_ms"] / result["min_ms"]})  # fmt: skip
    baseline = next((r for r in rows if r["impl"] == "reference_eager"), None)
    for row in rows if baseline is not None else []:
        row["speedup_vs_reference_fp32"] = row["images_per_s"] / baseline["images_per_s"]
    if device == "cuda" and "inference" in parts:
        rows += _compiled_inference(preset, image_size, tokens, mode, reps, rounds, shape | {"batch": 1})
    return rows


@torch.no_grad()
def _compiled_inference(preset, image_size, tokens, mode, reps, rounds, shape) -> list[dict]:
    model = _model(preset, image_size, tokens, "auto", "cuda").eval()
    images, ids, mask, _ = _inputs(model, 1, "cuda")
    net = torch.compile(model, mode=mode)

    def run(module: Callable) -> Callable[[], None]:
        def forward() -> None:
            torch.compiler.cudagraph_mark_step_begin()
            with _autocast("cuda", torch.float16):
                module(images, ids, mask)

        return forward

    runs = {"eval_graph_eager": run(model), "eval_graph_compiled": run(net)}
    results = compiled_side_by_side(runs, "cuda", 3 * reps, rounds)
    return [{"op": "model_inference", "impl": impl, "pass": "fwd", "dtype": "fp16", "shape": shape,
             "compile_mode": mode if impl.endswith("compiled") else None, "ms_per_image": result["median_ms"],
             **result, "speedup_vs_eager": results["eval_graph_eager"]["median_ms"] / result["median_ms"],
             "speedup_vs_eager_min": results["eval_graph_eager"]["min_ms"] / result["min_ms"]}
            for impl, result in results.items()]  # fmt: skip


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
    parser = script_parser(
        __doc__, "model", "fewer steps; on CPU the tiny preset at 64x64, batch 4 (a smoke test)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="eager and torch.compile side by side instead (results model_compile_<device>.json)",
    )
    parser.add_argument(
        "--session",
        action="store_true",
        help="with --compile: the GPU session's repetitions and precisions (benchmarks/gpu_session.sh)",
    )
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="with --compile: what to measure"
    )
    args = parser.parse_args()
    if args.session and not args.compile:
        parser.error("--session goes with --compile")
    if args.compile:
        rows = compile_comparison(args.device, args.quick, session=args.session, parts=tuple(args.parts))
        print(write_rows("model_compile", args.device, rows, args.out))
    else:
        print(write_rows("model", args.device, run(args.device, args.quick), args.out))


if __name__ == "__main__":
    main()
