"""The decoder LM that holds any FFN family: attention, positions, and the model itself."""

from moescale.model.attention import Attention, RelativeAttention, attention_mask
from moescale.model.transformer import (DEFAULT_AUX_LOSS_WEIGHTS, POSITIONS, Block, LayerNorm,
                                        LMOutput, TransformerLM, sparse_layer_numbers)

__all__ = [
    'Attention', 'Block', 'DEFAULT_AUX_LOSS_WEIGHTS', 'LMOutput', 'LayerNorm', 'POSITIONS',
    'RelativeAttention', 'TransformerLM', 'attention_mask', 'sparse_layer_numbers',
]
