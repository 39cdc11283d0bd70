"""The sharing-aware Conformer-CTC model."""

from nas.model.build import ConformerCTC, Store
from nas.model.conformer import ConformerLayer, Convolution, FeedForward, Linear, SelfAttention, Subsampling

__all__ = ["ConformerCTC", "Store", "ConformerLayer", "Convolution", "FeedForward", "Linear", "SelfAttention", "Subsampling"]
