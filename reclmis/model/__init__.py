"""The RecLMIS model: U-Net+PLAM, CLIP-style text encoder, Conditioned Interaction, reconstructors."""

from reclmis.model.interaction import ConditionedInteraction, InterestWeights
from reclmis.model.reclmis import RecLMIS, RecLMISOutput
from reclmis.model.reconstruction import ConditionedCrossAttention, ConditionedReconstructor
from reclmis.model.text_encoder import TextEncoder

__all__ = [
    "ConditionedCrossAttention",
    "ConditionedInteraction",
    "ConditionedReconstructor",
    "InterestWeights",
    "RecLMIS",
    "RecLMISOutput",
    "TextEncoder",
]
