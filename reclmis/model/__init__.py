"""The RecLMIS model: U-Net+PLAM, CLIP-style text encoder and its tokenizer, Conditioned Interaction,
reconstructors. It takes token ids and never imports ``reclmis.data``."""

from reclmis.model.interaction import ConditionedInteraction, InterestWeights
from reclmis.model.reclmis import RecLMIS, RecLMISOutput
from reclmis.model.reconstruction import ConditionedAttention, ConditionedReconstructor
from reclmis.model.text_encoder import TextEncoder, TextEncoderError, TextFeatureCache
from reclmis.model.tokenizer import NoteTokenizer

__all__ = [
    "ConditionedAttention",
    "ConditionedInteraction",
    "ConditionedReconstructor",
    "InterestWeights",
    "NoteTokenizer",
    "RecLMIS",
    "RecLMISOutput",
    "TextEncoder",
    "TextEncoderError",
    "TextFeatureCache",
]
