"""Instruments of the kernel report: work counted in Triton's interpreter, and compile facts for NVIDIA GPUs.

Nothing here names a kernel. Every Triton launch an op makes is captured at the interpreter's launch path
(``InterpretedFunction.run``: the kernel, its grid, arguments, constexprs, ``num_warps``/``num_stages``), the
work of every program at the interpreter's builder (each ``tl.dot``, and each global load, store and atomic
with its mask), and every torch operation the op runs between kernels at torch's dispatcher. So the counts
follow the kernels through any redesign.

    with count_work() as fwd:                      # TRITON_INTERPRET=1 before triton is first imported
        out = reclmis.ops.conditioned_attention(q, k, v, cond, mask, backend="triton")
    fwd.totals()        # {"launches": 1, "dot_flops": ..., "load_bytes": ..., ...}
    facts = compile_launches(fwd.launches, targets=(86, 90))   # sm_86 / sm_90: smem, registers, spills, mma

What is counted (per program, summed over the grid):
  dot_flops      2*M*N*K of every ``tl.dot`` (padding included), also split by operand class: ``fp16``,
                 ``bf16``, ``tf32``, ``tf32x3`` (three TF32 products on the GPU), ``fp32`` (``ieee``: no tensor
                 cores, FMA loops), ``int8``, ``fp8``, ``fp64``; ``tensor_core_flops`` sums the classes that
                 run on tensor cores
  load_bytes     bytes of every global load, masked-off elements excluded (gathers count what they fetch)
  store_bytes    likewise for stores; atomics are counted apart (``atomic_ops``, ``atomic_bytes`` read+written)
  torch ops      every aten operation the op runs outside Triton: a launch unless it only makes a view or
                 allocates, its bytes (inputs read, outputs written; in-place destinations count as written),
                 the flops of matrix products, and host synchronisations (``.item()``, and operations whose
                 output size depends on the data, such as ``nonzero``)

``compile_launches`` compiles each captured launch with its real signature, constexprs, warps and stages for
``GPUTarget("cuda", cc, 32)`` with Triton's own compiler and ptxas; no GPU is needed. It runs in a child
process with ``TRITON_INTERPRET=0``, because a kernel module imported under the interpreter holds interpreted
functions (and so does ``triton.language``'s own library) that Triton's code generator cannot compile: the child
imports each kernel again by module and name.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reclmis.kernels._runtime import interpreting

ROOT = Path(__file__).resolve().parents[2]
SMEM_LIMIT_BYTES = {86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # opt-in shared memory per block
TENSOR_CORE_CLASSES = ("fp16", "bf16", "tf32", "tf32x3", "int8", "fp8")  # dot classes NVIDIA runs on mma

# aten operations that launch nothing on a GPU: allocation and metadata (views are detected from the schema).
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "resize_"}
_HOST_SYNC = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "repeat_interleave"}
_TOTALS = ("programs", "dots", "dot_flops", "tensor_core_flops", "loads", "load_bytes", "stores", "store_bytes",
           "atomic_ops", "atomic_bytes", "matmul_flops")  # fmt: skip
_MATMUL_OPERANDS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2)}


# --------------------------------------------------------------------------------------------------------------
# Records


@dataclass
class LaunchRecord:
    """One kernel launch: what ``kernel[grid](*args, **kwargs)`` received, and the work its programs did."""

    kernel: str  # "module:qualname", how the compile step imports it again
    name: str
    grid: tuple[int, int, int]
    args: dict[str, Any]  # parameter name -> encoded value (see ``encode_arg``)
    options: dict[str, Any]  # num_warps, num_stages and other launch options
    constexpr_names: tuple[str, ...] = ()
    work: Counter = field(default_factory=Counter)

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def constexprs(self) -> dict[str, Any]:
        return {k: v for k, v in self.args.items() if k in self.constexpr_names}

    def spec(self) -> dict[str, Any]:
        """What the compile step needs (JSON-serialisable)."""
        return {"kernel": self.kernel, "name": self.name, "args": self.args, "options": self.options}


@dataclass
class TorchOpRecord:
    op: str
    launches: int
    read_bytes: int
    write_bytes: int
    flops: Counter
    host_syncs: int


def encode_arg(value: Any) -> Any:
    """A kernel argument as the compile step rebuilds it: tensors by dtype and 16-byte alignment only."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [encode_arg(v) for v in value]}
    import triton.language as tl

    if isinstance(value, tl.constexpr):
        return encode_arg(value.value)
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    fn = getattr(value, "fn", None)
    if fn is not None and hasattr(fn, "__qualname__"):  # a jitted function passed as a constexpr
        return {"jit_function": f"{fn.__module__}:{fn.__qualname__}"}
    return {"unsupported": type(value).__name__}


def _element_bytes(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _dot_class(dtype, input_precision) -> str:
    name = dtype.name  # triton dtype of the operands
    if name == "fp32":
        precision = getattr(input_precision, "name", str(input_precision)).lower()
        return {"tf32": "tf32", "tf32x3": "tf32x3"}.get(precision, "fp32")
    if name.startswith("fp8"):
        return "fp8"
    return {"u8": "int8", "i8": "int8"}.get(name, name)


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly broadcast) view addresses."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _unique(tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    """Each view once (an operation reading x twice, as in x * x, reads it once)."""
    seen = {}
    for t in tensors:
        seen.setdefault((t.data_ptr(), t.dtype, tuple(t.shape), t.stride()), t)
    return list(seen.values())


def _matmul_class(t: torch.Tensor) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(t.dtype, "fp32")


# --------------------------------------------------------------------------------------------------------------
# Counting


class WorkRecorder:
    """Launches and torch operations recorded by one ``count_work`` block."""

    def __init__(self, execute: bool) -> None:
        self.execute = execute
        self.launches: list[LaunchRecord] = []
        self.torch_ops: list[TorchOpRecord] = []
        self._current: Counter | None = None  # work of the launch being interpreted

    # -- interpreter side
    def begin_launch(self, fn, args: tuple, kwargs: dict, grid) -> LaunchRecord:
        from triton.runtime.jit import _normalize_ty

        names = list(inspect.signature(fn.fn).parameters)
        annotations = {k: _normalize_ty(v) for k, v in inspect.get_annotations(fn.fn).items()}
        bound = dict(zip(names, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names}
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        record = LaunchRecord(
            kernel=f"{fn.fn.__module__}:{fn.fn.__qualname__}",
            name=fn.fn.__name__,
            grid=grid,
            args={k: encode_arg(v) for k, v in bound.items()},
            options={k: encode_arg(v) for k, v in options.items()},
            constexpr_names=tuple(n for n in names if annotations.get(n) == "constexpr"),
        )
        self.launches.append(record)
        return record

    def count_dot(self, a, b, input_precision) -> None:
        if self._current is not None:
            flops = 2 * a.data.size * b.data.shape[-1]
            self._current["dots"] += 1
            self._current["dot_flops"] += flops
            self._current[f"dot_flops.{_dot_class(a.dtype, input_precision)}"] += flops

    def count_access(self, kind: str, ptrs, mask) -> None:
        if self._current is None:
            return
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)
        n = int(np.count_nonzero(active))
        if n:
            self._current[f"{kind}s"] += 1
            self._current[f"{kind}_bytes"] += n * _element_bytes(ptrs)

    def count_atomic(self, ptrs, mask) -> None:
        if self._current is None:
            return
        shape = ptrs.data.shape
        active = np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask.data, bool), shape)
        n = int(np.count_nonzero(active))
        self._current["atomic_ops"] += n
        self._current["atomic_bytes"] += 2 * n * _element_bytes(ptrs)

    # -- torch side
    def record_torch_op(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        name = func._schema.name.split("::")[-1]
        if name == "_local_scalar_dense":  # .item() and the like: a copy to the host, nothing launched
            self.torch_ops.append(TorchOpRecord(name, 0, 0, 0, Counter(), 1))
            return
        if func.is_view or name in _NO_LAUNCH:
            return
        schema = func._schema.arguments
        written_names = {a.name for a in schema if a.alias_info is not None and a.alias_info.is_write}
        named = [(schema[i].name, v) for i, v in enumerate(args)] + list(kwargs.items())
        written = _unique(t for n, v in named if n in written_names for t in _tensors(v))
        read = _unique(t for n, v in named if n not in written_names for t in _tensors(v))
        outputs = _unique(t for t in _tensors(out) if not any(t is w for w in written))
        flops: Counter = Counter()
        if name in _MATMUL_OPERANDS:
            i, j = _MATMUL_OPERANDS[name]
            a, b = args[i], args[j]
            flops[_matmul_class(a)] += 2 * a.numel() * b.shape[-1]
        self.torch_ops.append(
            TorchOpRecord(
                op=name,
                launches=1,
                read_bytes=sum(_distinct_bytes(t) for t in read),
                write_bytes=sum(_distinct_bytes(t) for t in written + outputs),
                flops=flops,
                host_syncs=int(name in _HOST_SYNC),  # output size depends on the data
            )
        )

    # -- results
    def per_kernel(self) -> dict[str, Counter]:
        """Work summed per kernel name (several launches of one kernel add up), plus "torch" for torch ops."""
        out: dict[str, Counter] = {}
        for launch in self.launches:
            c = out.setdefault(launch.name, Counter())
            c["launches"] += 1
            c["programs"] += launch.programs
            c.update(launch.work)
        if self.torch_ops:
            c = out.setdefault("torch", Counter())
            for op in self.torch_ops:
                c["launches"] += op.launches
                c["load_bytes"] += op.read_bytes
                c["store_bytes"] += op.write_bytes
                c["host_syncs"] += op.host_syncs
                for cls, f in op.flops.items():
                    c["matmul_flops"] += f
                    c[f"matmul_flops.{cls}"] += f
        return out

    def totals(self) -> dict[str, int]:
        """Flat counts: launches (Triton + torch), dot flops by class, bytes (Triton + torch ops), syncs."""
        total: Counter = Counter(dict.fromkeys(_TOTALS, 0))
        total["triton_launches"] = len(self.launches)
        total["torch_launches"] = sum(op.launches for op in self.torch_ops)
        total["launches"] = total["triton_launches"] + total["torch_launches"]
        total["host_syncs"] = sum(op.host_syncs for op in self.torch_ops)
        for launch in self.launches:
            total["programs"] += launch.programs
            total.update(launch.work)
        total["tensor_core_flops"] = sum(total[f"dot_flops.{cls}"] for cls in TENSOR_CORE_CLASSES)
        total["triton_load_bytes"] = total["load_bytes"]
        total["triton_store_bytes"] = total["store_bytes"]
        total["torch_read_bytes"] = sum(op.read_bytes for op in self.torch_ops)
        total["torch_write_bytes"] = sum(op.write_bytes for op in self.torch_ops)
        total["load_bytes"] += total["torch_read_bytes"]
        total["store_bytes"] += total["torch_write_bytes"]
        for op in self.torch_ops:
            for cls, f in op.flops.items():
                total["matmul_flops"] += f
                total[f"matmul_flops.{cls}"] += f
        return {k: int(v) for k, v in sorted(total.items())}


class _TorchOps(TorchDispatchMode):
    """Records the aten operations an op runs; registered custom ops are opened up, so their insides count."""

    def __init__(self, recorder: WorkRecorder) -> None:
        super().__init__()
        self.recorder = recorder
        self.in_launch = False  # the interpreter's own host copies around a launch are not the op's work

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_launch:
            return func(*args, **kwargs)
        if func.namespace not in ("aten", "prims"):
            for key in ("CPU", "CompositeExplicitAutograd"):
                if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key):
                    with self:
                        return func._op_dk(getattr(torch._C.DispatchKey, key), *args, **kwargs)
        out = func(*args, **kwargs)
        self.recorder.record_torch_op(func, args, kwargs, out)
        return out


_ACTIVE: list[WorkRecorder] = []


@contextlib.contextmanager
def count_work(*, execute: bool = True) -> Iterator[WorkRecorder]:
    """Record every Triton launch and torch operation run inside the block (see the module docstring).

    ``execute=False`` captures the launches without running them (their outputs stay uninitialised): the
    fast way to collect what the compile step needs at full size, in dtypes the interpreter cannot run (bf16).
    """
    if not interpreting():
        raise RuntimeError(
            "count_work needs Triton's interpreter: set TRITON_INTERPRET=1 before triton is first imported"
        )
    if _ACTIVE:
        raise RuntimeError("count_work blocks do not nest")
    from triton.runtime import interpreter

    recorder = WorkRecorder(execute)
    builder = interpreter.interpreter_builder
    originals = {
        name: getattr(builder, name)
        for name in ("create_dot", "create_masked_load", "create_masked_store", "create_atomic_rmw")
    }
    original_cas = builder.create_atomic_cas
    run = interpreter.InterpretedFunction.run
    torch_ops = _TorchOps(recorder)

    def counted_run(fn, *args, grid, warmup, **kwargs):
        if warmup:
            return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
        launch = recorder.begin_launch(fn, args, kwargs, grid)
        if not recorder.execute:
            return None
        recorder._current, torch_ops.in_launch = launch.work, True
        try:
            return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            recorder._current, torch_ops.in_launch = None, False

    def dot(a, b, d, input_precision, max_num_imprecise_acc):
        recorder.count_dot(a, b, input_precision)
        return originals["create_dot"](a, b, d, input_precision, max_num_imprecise_acc)

    # the options after the mask (cache and eviction policies, volatility) differ between Triton releases
    def load(ptrs, mask, other, *options):
        recorder.count_access("load", ptrs, mask)
        return originals["create_masked_load"](ptrs, mask, other, *options)

    def store(ptrs, value, mask, *options):
        recorder.count_access("store", ptrs, mask)
        return originals["create_masked_store"](ptrs, value, mask, *options)

    def atomic_rmw(op, ptrs, value, mask, sem, scope):
        recorder.count_atomic(ptrs, mask)
        return originals["create_atomic_rmw"](op, ptrs, value, mask, sem, scope)

    def atomic_cas(ptrs, cmp, value, sem, scope):
        recorder.count_atomic(ptrs, None)
        return original_cas(ptrs, cmp, value, sem, scope)

    hooks = {
        "create_dot": dot,
        "create_masked_load": load,
        "create_masked_store": store,
        "create_atomic_rmw": atomic_rmw,
        "create_atomic_cas": atomic_cas,
    }
    for name, hook in hooks.items():
        setattr(builder, name, hook)  # instance attributes shadow the class's methods
    interpreter.InterpretedFunction.run = counted_run
    _ACTIVE.append(recorder)
    try:
        with torch_ops:
            yield recorder
    finally:
        _ACTIVE.pop()
        interpreter.InterpretedFunction.run = run
        for name in hooks:
            delattr(builder, name)


# --------------------------------------------------------------------------------------------------------------
# Extrapolation in the batch size


def extrapolate(
    counts: dict[int, dict[str, int]], degree: int, target: int
) -> tuple[dict[str, int], int | None]:
    """Counts at batch ``target`` from counts at smaller batches, as polynomials of ``degree`` in the batch.

    Uses the ``degree + 1`` smallest batches of ``counts`` to fit (exact rational Lagrange interpolation) and,
    when there is one more, checks the fit there. Returns (counts at target, the batch it was checked at or
    None); raises ``ValueError`` when the check fails or a value at ``target`` is not an integer.
    """
    from fractions import Fraction

    batches = sorted(counts)
    if len(batches) < degree + 1:
        raise ValueError(f"a degree-{degree} fit needs {degree + 1} batches, got {batches}")
    fit, checks = batches[: degree + 1], batches[degree + 1 :]
    keys = sorted(set().union(*(counts[b] for b in batches)))

    def at(x: int, key: str) -> Fraction:
        total = Fraction(0)
        for i, xi in enumerate(fit):
            term = Fraction(counts[xi].get(key, 0))
            for j, xj in enumerate(fit):
                if j != i:
                    term *= Fraction(x - xj, xi - xj)
            total += term
        return total

    for b in checks:
        wrong = [k for k in keys if at(b, k) != counts[b].get(k, 0)]
        if wrong:
            raise ValueError(
                f"counts are not degree-{degree} polynomials of the batch: fitted on {fit}, "
                f"batch {b} differs in {', '.join(wrong[:5])}"
            )
    out = {}
    for k in keys:
        value = at(target, k)
        if value.denominator != 1:
            raise ValueError(f"{k} extrapolates to a fraction at batch {target}: {value}")
        out[k] = int(value)
    return out, (checks[0] if checks else None)


# --------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (runs in a child process without the interpreter)


def compile_launches(
    launches: Sequence[LaunchRecord | dict[str, Any]],
    targets: Sequence[int] = (86, 90),
    *,
    jobs: int = 1,
    timeout: float = 3600,
) -> list[dict[str, dict[str, Any]]]:
    """Compile facts of each launch for each target capability: ``[{"sm_86": facts, "sm_90": facts}, ...]``.

    Facts: shared_bytes (Triton's shared memory per block), smem_limit_bytes, registers, spill_store_bytes,
    spill_load_bytes, stack_bytes (ptxas -v), mma_sync and wgmma (tensor-core instructions in the PTX),
    dots (each ``tt.dot`` of the Triton IR: operand types, precision, M x N x K), num_warps, num_stages, and
    "error" (the compiler's message) where compilation failed.
    """
    specs = [launch.spec() if isinstance(launch, LaunchRecord) else launch for launch in launches]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "launches.json", Path(tmp) / "facts.json"
        src.write_text(json.dumps({"specs": specs, "targets": list(targets)}))
        env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
        proc = subprocess.run(
            [sys.executable, "-m", "tools.kernel_report.counting", str(src), str(dst), "--jobs", str(jobs)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the compile step failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(dst.read_text())


def nvidia_backend_missing() -> str | None:
    """Why Triton cannot compile for NVIDIA targets here (None when it can)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 86, 32))
        if not Path(get_ptxas(86).path).is_file():
            return "Triton's NVIDIA backend has no ptxas"
    except Exception as e:  # ImportError, RuntimeError: no backend, no ptxas
        return f"Triton's NVIDIA backend is not usable: {type(e).__name__}: {e}"
    return None


def _decode_arg(value: Any) -> Any:
    from triton.runtime.jit import MockTensor

    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        tensor = MockTensor(getattr(torch, value["tensor"]))
        if not value["aligned"]:
            tensor.data_ptr = lambda: 8  # specialisation reads only data_ptr() % 16
        return tensor
    if "tuple" in value:
        return tuple(_decode_arg(v) for v in value["tuple"])
    if "tl_dtype" in value:
        import triton.language as tl

        return getattr(tl, value["tl_dtype"])
    if "jit_function" in value:
        return _import_kernel(value["jit_function"])
    raise TypeError(f"cannot rebuild a kernel argument of type {value['unsupported']} for compilation")


def _import_kernel(path: str):
    import importlib

    from triton.runtime.jit import JITFunction

    module, qualname = path.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):  # autotuner, heuristics
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        raise TypeError(f"{path} is not a triton.jit function (got {type(obj).__name__})")
    return obj


_DOT = re.compile(
    r"tt\.dot\s.*?(?:inputPrecision\s*=\s*(\w+))?\s*:\s*tensor<([\dx]+)x(\w+)[,>].*?\*\s*tensor<([\dx]+)x(\w+)[,>]"
)
_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
}


def _ttir_dots(ttir: str) -> list[dict[str, str]]:
    dots = []
    for line in ttir.splitlines():
        if "tt.dot" not in line:
            continue
        m = _DOT.search(line)
        if m:
            precision, a_shape, a_ty, b_shape, b_ty = m.groups()
            (mm, k), n = a_shape.split("x")[-2:], b_shape.split("x")[-1]
            dots.append({"a": a_ty, "b": b_ty, "precision": precision or "", "mnk": f"{mm}x{n}x{k}"})
    return dots


def _ptxas_facts(ptx: str, capability: int, log: str) -> dict[str, int]:
    """Registers, spills and stack from ``ptxas -v``: the log of Triton's own ptxas run when it compiled now,
    else (a kernel from Triton's cache) a run of the same ptxas and flags; cached by the PTX's hash."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.runtime.cache import get_cache_manager

    arch = sm_arch_from_capability(capability)
    ptxas = get_ptxas(capability).path
    cache = get_cache_manager(hashlib.sha256(f"{ptxas}\n{arch}\n{ptx}".encode()).hexdigest())
    cached = cache.get_file("ptxas_v.json")
    if cached is not None:
        return json.loads(Path(cached).read_text())
    if not _PTXAS["registers"].search(log):
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "kernel.ptx"
            src.write_text(ptx)
            command = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src)]
            proc = subprocess.run([*command, "-o", f"{src}.o"], capture_output=True, text=True, check=True)
        log = proc.stdout + proc.stderr
    facts = {key: int(m.group(1)) if (m := rx.search(log)) else 0 for key, rx in _PTXAS.items()}
    cache.put(json.dumps(facts), "ptxas_v.json", binary=False)
    return facts


def _compile_one(item: tuple[dict[str, Any], int]) -> dict[str, Any]:
    """Compile one launch for one capability (in the child process)."""
    import warnings

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    spec, capability = item
    try:
        kernel = _import_kernel(spec["kernel"])
        target = GPUTarget("cuda", capability, 32)
        backend = make_backend(target)
        args = {k: _decode_arg(v) for k, v in spec["args"].items()}
        kwargs = {**args, **{k: _decode_arg(v) for k, v in spec["options"].items()}}
        kwargs.setdefault("debug", kernel.debug or knobs.runtime.debug)  # as JITFunction.run sets them
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # a compile option since Triton 3.9
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(**kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, kwargs, bound, specialization, options
        )
        log = io.StringIO()
        with warnings.catch_warnings(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")  # Triton 3.9's notice about the fp-fusion default
            knobs.nvidia.dump_ptxas_log = True  # printed when ptxas runs, i.e. unless the kernel is cached
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
            )
        ptx = compiled.asm["ptx"]
        facts = {
            "shared_bytes": int(compiled.metadata.shared),
            "smem_limit_bytes": SMEM_LIMIT_BYTES.get(capability),
            "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages,
            **_ptxas_facts(ptx, capability, log.getvalue()),
            "mma_sync": len(re.findall(r"\bmma\.sync\.", ptx)),
            "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
            "dots": _ttir_dots(compiled.asm["ttir"]),
        }
    except Exception as e:  # a launch that does not compile is a fact of the report, not a crash
        return {"error": f"{type(e).__name__}: {e}"[:2000]}
    return facts


def _compile_main(argv: Sequence[str]) -> None:
    import argparse
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(description="compile captured launches (the kernel report's child step)")
    parser.add_argument("launches")
    parser.add_argument("facts")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    payload = json.loads(Path(args.launches).read_text())
    specs, targets = payload["specs"], payload["targets"]
    # Launches that differ only in values Triton does not specialise on compile to the same kernel.
    unique = {json.dumps(s, sort_keys=True): s for s in specs}
    items = [(s, cc) for s in unique.values() for cc in targets]
    if args.jobs > 1 and len(items) > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_compile_one, items))
    else:
        results = [_compile_one(item) for item in items]
    by_item = {(json.dumps(s, sort_keys=True), cc): r for (s, cc), r in zip(items, results, strict=True)}
    out = [{f"sm_{cc}": by_item[json.dumps(s, sort_keys=True), cc] for cc in targets} for s in specs]
    Path(args.facts).write_text(json.dumps(out))


def uses_tensor_cores(facts: dict[str, Any]) -> bool:
    return facts.get("mma_sync", 0) + facts.get("wgmma", 0) > 0


def half_precision_dots(facts: dict[str, Any]) -> bool:
    """Whether the kernel's Triton IR holds a dot on fp16/bf16 operands."""
    return any(d["a"] in ("f16", "bf16") for d in facts.get("dots", []))


if __name__ == "__main__":
    _compile_main(sys.argv[1:])
