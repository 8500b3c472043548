"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = next(block for block in blocks if "RecLMIS.build" in block)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert namespace["logits"].shape == namespace["masks"].shape
