"""The decoder LM that holds any FFN family: attention, positions, blocks and the model itself."""

from moescale.model.attention import Attention, RelativeAttention, attention_mask
from moescale.model.blocks import Block, LayerNorm, sparse_layer_numbers
from moescale.model.transformer import POSITIONS, LMOutput, TransformerLM

__all__ = [
    'Attention', 'Block', 'LMOutput', 'LayerNorm', 'POSITIONS', 'RelativeAttention',
    'TransformerLM', 'attention_mask', 'sparse_layer_numbers',
]
