"""reclmis.kernels is a leaf of the package: its modules import torch, triton, the standard library and each
other, never the rest of reclmis; and reclmis.ops imports without triton (macOS has no triton wheel)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import reclmis.kernels

KERNELS = Path(reclmis.kernels.__file__).parent
ALLOWED = {"torch", "triton", *sys.stdlib_module_names}


def _imports(path: Path, package: str = "reclmis.kernels") -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, a module of ``package``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(
            node, ast.ImportFrom
        ):  # relative: from .m import a, from . import a, from .. import a
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            if node.module:
                found.append((node.lineno, f"{base}.{node.module}".lstrip(".")))
            else:
                found += [(node.lineno, f"{base}.{alias.name}".lstrip(".")) for alias in node.names]
    return found


def test_kernel_modules_import_nothing_from_the_rest_of_reclmis() -> None:
    files = sorted(KERNELS.rglob("*.py"))
    assert {"conditioned_attention.py", "max_similarity.py", "_runtime.py"} <= {f.name for f in files}
    wrong = [
        f"{path.relative_to(KERNELS.parent.parent)}:{line} imports {module}"
        for path in files
        for line, module in _imports(path)
        if not (module == "reclmis.kernels" or module.startswith("reclmis.kernels."))
        and module.partition(".")[0] not in ALLOWED
    ]
    assert not wrong, "\n".join(wrong)


def test_relative_imports_above_the_package_are_caught(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from .. import ops\nfrom ._runtime import interpreting\nimport numpy\n")
    assert _imports(module) == [(1, "reclmis.ops"), (2, "reclmis.kernels._runtime"), (3, "numpy")]


def test_ops_import_and_run_without_triton() -> None:
    """With triton unimportable, reclmis.ops imports, "auto" runs the references, "triton" says why not."""
    script = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch
import reclmis.ops as ops
q = torch.randn(1, 2, 3, 16)
ops.conditioned_attention(q, q, q, torch.rand(1, 3))
ops.max_similarity(torch.randn(2, 4, 8), torch.randn(3, 5, 8), torch.rand(2, 4), torch.rand(3, 5))
try:
    ops.max_similarity(torch.randn(2, 4, 8), torch.randn(3, 5, 8), torch.rand(2, 4), torch.rand(3, 5),
                       backend="triton")
except RuntimeError as error:
    print(error)
assert not [name for name, m in sys.modules.items() if name.startswith("triton") and m is not None]
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs the triton package, which is not installed" in proc.stdout
