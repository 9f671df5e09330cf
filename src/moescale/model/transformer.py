"""The decoder-only language model that holds any FFN family, and its Transformer-XL variant.

    x = embed(tokens) · sqrt(d)  [+ absolute positions]                 [batch, length, d_model]
    for each block:  x = x + Attn(LN(x));  x = x + FFN(LN(x))            pre-LayerNorm
    logits = LN(x) @ embed^T  (or a separate output layer [+ bias])       [batch, length, vocab]

The model never names an FFN family: `ffn` and `sparse_ffn` are constructors called as
`ffn(d_model=d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)` (e.g.
`functools.partial(DenseFFN, d_ff=3072)`: the model's precision reaches every sublayer). Each
sublayer returns `(y, aux)` (`layers.common.Aux`): the model sums the already weighted
`aux.losses` over layers into `LMOutput.aux_loss` and reports `aux.metrics` per layer. The aux
values are ordinary outputs, so the same code runs looped, under `nnx.remat` and `nnx.scan`.

Calling under transforms: the default (looped, no remat) model works anywhere, including a
plain `jax.jit` / `jax.grad` closure, as long as its sublayers are stateless in that call.
`remat=True` and `scan_layers=True` use NNX transforms, which (as for any NNX module) need the
model passed through `nnx.jit` / `nnx.grad`, or `nnx.split` outside and `nnx.merge` inside
a `jax.jit` function; a raw closure over such a model raises flax's TraceContextError.

Layers: block i (1-based, as fairseq counts) carries `sparse_ffn` when i is in
`sparse_layers` ('every_other' = 2, 4, 6, ...), `ffn` otherwise. With `scan_layers=True`
the smallest repeating run of blocks (2 for every_other, 1 for all/none) is stacked with a
leading 'layers' axis and run by `nnx.scan`, so compile time stays flat in depth.

Transformer-XL (positions='relative'): `memory` is a list with one [batch, mem, d_model]
array per layer, the *inputs* of that layer (the residual stream, before its LayerNorm) for
the previous segment(s). Each block attends over LN(memory ++ x) with relative positions, and
the new memory (the last `mem_len` of memory ++ x, without gradient) is returned. Memory is
meant for contiguous unpacked streams (Csordás et al.): with segment_ids, every non-padding
token sees the whole memory.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moescale import sharding as shd
from moescale.layers import common
from moescale.model import attention as attention_lib
from moescale.model import blocks as blocks_lib
from moescale.model import positions as positions_lib
from moescale.model.blocks import ACT_RESIDUAL, Block, FFNConstructor, LayerNorm
from moescale.model.output import LMOutput, collect, next_memory_mask

POSITIONS = ('sinusoidal', 'learned', 'rotary', 'relative')
EMBEDDING_INITS = ('fairseq', 'csordas')


class TransformerLM(nnx.Module):
  """Decoder-only LM (fairseq GPT-3 style, or Transformer-XL with positions='relative').

  Args:
    vocab_size, d_model, num_layers, num_heads: the usual shape; head_dim defaults to
      d_model // num_heads.
    ffn: constructor of the FFN sublayer, called as
      `ffn(d_model=d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)`.
    sparse_ffn: constructor used on `sparse_layers` instead of `ffn`, or None (all `ffn`).
    sparse_layers: 'every_other' (2, 4, ...), 'all', 'none', or 1-based layer numbers.
    positions: 'sinusoidal' (fairseq), 'learned', 'rotary', 'relative' (Transformer-XL).
    max_length: rows of the learned position table (only used by 'learned').
    mem_len: Transformer-XL memory kept per layer (positions='relative'); 0 keeps none.
    scale_embeddings: multiply token embeddings by sqrt(d_model) (fairseq, Transformer-XL).
    tie_embeddings: logits use the input embedding matrix (no separate output projection).
    embedding_init: 'fairseq': the embedding (and an untied output layer) N(0, 1/d_model);
      'csordas': as Csordás et al.'s code, the embedding Xavier-uniform over
      (vocab_size, d_model) (std sqrt(2/(vocab_size + d_model)): 0.015 for 8k x 412) and the
      untied output layer PyTorch's Linear default, U(-1/sqrt(d), 1/sqrt(d)) (its bias too).
    output_bias: a bias on the (untied) output layer (Csordás et al.: yes; fairseq: no).
    dropout: on embeddings and on both sublayer outputs; attention_dropout: on attention
      probabilities. (Dropout inside the FFN is the FFN constructor's business.)
    output_dropout: dropout (rate `dropout`) between the final LayerNorm and the output layer
      (Csordás et al.'s code has it; fairseq not).
    use_bias: biases in the attention projections.
    init_scale: the attention projections (q, k, v, o and Transformer-XL's position
      projection) start at N(0, init_scale²/fan_in); Csordás et al. use c = sqrt(2/num_layers)
      (`layers.common.depth_scale`), and the FFN constructor gets its own.
    attention_kernels: what computes softmax(q k^T) v ('auto', 'xla', 'cpu'; see
      model.attention_kernels). Transformer-XL's relative attention always uses XLA's ops.
    remat: rematerialise each block in the backward pass (nnx.remat).
    scan_layers: stack the repeating run of blocks and run it with nnx.scan (the default):
      compile time stays flat in depth. Parameters then carry a leading 'layers' axis (logical
      name 'layers', which sharding rules map to None). False runs a Python loop over
      separate blocks: friendlier for eager calls in a notebook (an eager call of a scanned
      model traces and compiles its scan each time) and for reading one layer's weights.
    dtype: compute dtype; param_dtype: storage dtype. Logits are returned in float32 (or
      float64 when dtype is).
  """

  def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               head_dim: int | None = None, *, ffn: FFNConstructor,
               sparse_ffn: FFNConstructor | None = None,
               sparse_layers: str | Sequence[int] = 'every_other',
               positions: str = 'sinusoidal', max_length: int = 2048, mem_len: int = 0,
               scale_embeddings: bool = True, tie_embeddings: bool = True,
               embedding_init: str = 'fairseq', output_bias: bool = False,
               dropout: float = 0.0, attention_dropout: float = 0.0,
               output_dropout: bool = False, use_bias: bool = True, init_scale: float = 1.0,
               layernorm_eps: float = 1e-5, attention_kernels: str = 'auto',
               remat: bool = False, scan_layers: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    common.check_positive(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
                          num_heads=num_heads, max_length=max_length)
    if head_dim is None and d_model % num_heads:
      raise ValueError(f'd_model={d_model} is not divisible by num_heads={num_heads}; '
                       'pass head_dim explicitly or choose a divisor of d_model')
    if positions not in POSITIONS:
      raise ValueError(f'unknown positions={positions!r}; valid: {list(POSITIONS)}')
    if mem_len < 0 or (mem_len and positions != 'relative'):
      raise ValueError(f"mem_len={mem_len} needs positions='relative' and must be >= 0")
    if embedding_init not in EMBEDDING_INITS:
      raise ValueError(f'unknown embedding_init={embedding_init!r}; valid: '
                       f'{list(EMBEDDING_INITS)}')
    if output_bias and tie_embeddings:
      raise ValueError('output_bias=True needs tie_embeddings=False (a separate output layer)')
    sparse = (blocks_lib.sparse_layer_numbers(sparse_layers, num_layers)
              if sparse_ffn is not None else ())
    self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_layers
    self.positions = positions
    self.mem_len = mem_len
    self.scale_embeddings = scale_embeddings
    self.sparse_layers = sparse
    self.dropout_rate = dropout
    self.output_dropout = output_dropout
    self.remat, self.scan_layers = remat, scan_layers
    self.dtype = dtype

    # fairseq's Embedding init N(0, d^-1/2): with the sqrt(d) scale, inputs start at unit size.
    embed_init = (common.normal(d_model ** -0.5) if embedding_init == 'fairseq'
                  else nnx.initializers.xavier_uniform())
    self.embed = common.param(rngs, embed_init, (vocab_size, d_model), ('vocab', 'embed'),
                              param_dtype)
    self.position_table = (positions_lib.LearnedPositions(
        max_length, d_model, param_dtype=param_dtype, rngs=rngs)
                           if positions == 'learned' else None)
    block_kwargs = dict(d_model=d_model, num_heads=num_heads, head_dim=head_dim,
                        positions=positions, use_bias=use_bias, dropout=dropout,
                        attention_dropout=attention_dropout, layernorm_eps=layernorm_eps,
                        attention_kernels=attention_kernels, init_scale=init_scale,
                        dtype=dtype, param_dtype=param_dtype)
    self._build_blocks([sparse_ffn if i in sparse else ffn for i in range(1, num_layers + 1)],
                       block_kwargs, rngs)
    self.final_norm = LayerNorm(d_model, eps=layernorm_eps, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
    out_init = (common.normal(d_model ** -0.5) if embedding_init == 'fairseq'
                else common.uniform(d_model ** -0.5))
    self.unembed = (None if tie_embeddings else common.param(
        rngs, out_init, (d_model, vocab_size), ('embed', 'vocab'), param_dtype))
    self.output_bias = (common.param(rngs, common.uniform(d_model ** -0.5), (vocab_size,),
                                     ('vocab',), param_dtype) if output_bias else None)
    self.rngs = rngs if dropout > 0 else None

  def _build_blocks(self, ffns: list[FFNConstructor], block_kwargs: dict, rngs: nnx.Rngs):
    """`self.blocks` (one Block a layer) or, with scan_layers, `self.groups`: the repeating
    run of blocks, its parameters stacked num_groups deep."""
    if not self.scan_layers:
      self.period, self.num_groups, self.groups = 1, self.num_layers, None
      self.blocks = nnx.List([Block(ffn=f, rngs=rngs, **block_kwargs) for f in ffns])
      return
    period = blocks_lib.repeating_period([f is not ffns[0] for f in ffns])
    self.period, self.num_groups, self.blocks = period, self.num_layers // period, None

    # Each group gets its own keys (a new Rngs split num_groups ways, stacked like the
    # parameters) and keeps them for dropout; the model's own rngs object is not captured.
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_groups(group_rngs):
      return blocks_lib.BlockGroup(ffns[:period], block_kwargs, group_rngs)

    self.groups = make_groups(rngs.split(self.num_groups))

  # --- Introspection (cost accounting) -----------------------------------------------------

  def _blocks_by_layer(self) -> Iterator[tuple[int, Block]]:
    """(1-based layer number, block). With scan_layers the block is the stacked one shared by
    every group, which is what `cost()` (config ints only) needs."""
    for i in range(self.num_layers):
      if self.blocks is not None:
        yield i + 1, self.blocks[i]
      else:
        yield i + 1, self.groups.blocks[i % self.period]

  def ffn_layers(self) -> list[tuple[int, nnx.Module]]:
    """[(layer number, FFN sublayer)] for every block, in order."""
    return [(n, block.ffn) for n, block in self._blocks_by_layer()]

  def attention_layers(self) -> list[tuple[int, attention_lib.Attention]]:
    """[(layer number, attention sublayer)] for every block, in order."""
    return [(n, block.attention) for n, block in self._blocks_by_layer()]

  # --- Forward -----------------------------------------------------------------------------

  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True,
               memory: Sequence[jax.Array] | None = None,
               memory_mask: jax.Array | None = None, mem_len: int | None = None) -> LMOutput:
    """tokens: [batch, length] int -> LMOutput.

    segment_ids, positions: [batch, length] int from seqio's packing (0 = padding; positions
      restart at 0 per segment). Without positions they are derived from segment_ids (or
      0..length-1). Attention never crosses a segment boundary.
    memory: Transformer-XL memory from the previous call's `LMOutput.memory` (a list, one
      [batch, mem, d_model] per layer; any mem length, e.g. longer at evaluation).
    memory_mask: [batch, mem] bool, False for slots that hold no token yet (a stream's first
      segments, or a row whose stream restarted); None: every slot is a token.
    mem_len: how much new memory to return; defaults to the constructor's mem_len (pass a
      larger value at evaluation to keep several segments, as Csordás et al. do at test time).
    """
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be [batch, length], got shape {tokens.shape}')
    mem_len = self.mem_len if mem_len is None else mem_len
    memory = self._check_memory(memory, mem_len)
    if memory_mask is not None and (memory is None or memory_mask.shape != memory[0].shape[:2]):
      raise ValueError(f'memory_mask {memory_mask.shape} must be [batch, mem] of the memory '
                       f'{None if memory is None else memory[0].shape[:2]}')
    if positions is None:
      batch, length = tokens.shape
      positions = (positions_lib.positions_from_segments(segment_ids)
                   if segment_ids is not None
                   else jnp.broadcast_to(jnp.arange(length), (batch, length)))

    x = self._embed(tokens, positions, deterministic)
    run = self._run_scanned if self.scan_layers else self._run_looped
    x, records, new_memory = run(x, segment_ids, positions, (memory, memory_mask), mem_len,
                                 deterministic)

    x = hidden = self.final_norm(x)
    if self.output_dropout:
      x = common.dropout(x, self.dropout_rate, deterministic, self.rngs)
    if self.unembed is None:
      logits = jnp.einsum('bld,vd->blv', x, self.embed[...].astype(self.dtype))
    else:
      logits = jnp.einsum('bld,dv->blv', x, self.unembed[...].astype(self.dtype))
    if self.output_bias is not None:
      logits = logits + self.output_bias[...].astype(self.dtype)
    logits = shd.constrain(logits, ('act_batch', 'act_length', 'act_vocab'))
    aux_losses, aux_loss, metrics = collect(records)
    stats = {f'layer_{n:02d}': dict(aux.batch_stats) for n, aux in records if aux.batch_stats}
    # float32 at least (bfloat16 logits lose the loss), float64 kept for gradient checks.
    logits = logits.astype(jnp.promote_types(self.dtype, jnp.float32))
    out = LMOutput(logits=logits, aux_loss=aux_loss, aux_losses=aux_losses, metrics=metrics,
                   batch_stats=stats, hidden=hidden)
    if not mem_len:
      return out
    return out.replace(memory=new_memory, memory_mask=next_memory_mask(memory, memory_mask,
                                                                        tokens.shape, mem_len))

  def batch_losses(self, batch_stats: dict[str, dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """name -> loss summed over layers, from `LMOutput.batch_stats` (summed over the
    microbatches of one batch): the batch-level part of `aux_losses`, of the whole batch."""
    out: dict[str, jax.Array] = {}
    for n, ffn in self.ffn_layers():
      key = f'layer_{n:02d}'
      if key in batch_stats:
        for name, value in ffn.batch_losses(batch_stats[key]).items():
          out[name] = out.get(name, 0.0) + jnp.asarray(value, jnp.float32)
    return out

  def _check_memory(self, memory, mem_len):
    if self.positions != 'relative' and (memory is not None or mem_len):
      raise ValueError(f"memory needs positions='relative', not {self.positions!r}")
    if memory is None:
      return None
    memory = list(memory)
    if len(memory) != self.num_layers:
      raise ValueError(f'memory has {len(memory)} entries; need one per layer '
                       f'({self.num_layers})')
    # The memory is a constant: no gradient reaches the previous segment (Dai et al.).
    return [jax.lax.stop_gradient(m) for m in memory]

  def _embed(self, tokens, positions, deterministic):
    """tokens [batch, length] -> the residual stream's input [batch, length, d_model]."""
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    if self.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(self.d_model), self.dtype)
    if self.positions == 'sinusoidal':
      x = x + positions_lib.sinusoidal_embedding(positions, self.d_model, self.dtype)
    elif self.positions == 'learned':
      if tokens.shape[1] > self.position_table.max_length:
        raise ValueError(f'length {tokens.shape[1]} exceeds '
                         f'max_length={self.position_table.max_length}')
      x = x + self.position_table(positions).astype(self.dtype)
    x = common.dropout(x, self.dropout_rate, deterministic, self.rngs)
    return shd.constrain(x, ACT_RESIDUAL)

  def _block_fn(self, segment_ids, positions, memory_mask, mem_len, deterministic):
    """block, x, memory -> (x, aux, new memory); remat-wrapped if asked."""

    def step(block: Block, x: jax.Array, memory: jax.Array | None):
      y, aux = block(x, segment_ids=segment_ids, positions=positions, memory=memory,
                     memory_mask=memory_mask, deterministic=deterministic)
      new_memory = None
      if mem_len:
        context = x if memory is None else jnp.concatenate([memory.astype(x.dtype), x], 1)
        new_memory = jax.lax.stop_gradient(context[:, -mem_len:])
      return y, aux, new_memory

    return nnx.remat(step) if self.remat else step

  def _run_looped(self, x, segment_ids, positions, memory, mem_len, deterministic):
    memory, memory_mask = memory
    step = self._block_fn(segment_ids, positions, memory_mask, mem_len, deterministic)
    records, new_memory = [], []
    for i, block in enumerate(self.blocks):
      x, aux, mem = step(block, x, None if memory is None else memory[i])
      records.append((i + 1, aux))
      new_memory.append(mem)
    return x, records, new_memory

  def _run_scanned(self, x, segment_ids, positions, memory, mem_len, deterministic):
    memory, memory_mask = memory
    step = self._block_fn(segment_ids, positions, memory_mask, mem_len, deterministic)
    p, g = self.period, self.num_groups
    # [layers, ...] -> [groups, period, ...]: layer n = group·period + j (0-based).
    stacked_memory = (None if memory is None else
                      jnp.stack(memory).reshape((g, p) + memory[0].shape))

    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def body(group, x, group_memory):
      outs = []
      for j, block in enumerate(group.blocks):
        x, aux, mem = step(block, x, None if group_memory is None else group_memory[j])
        outs.append((aux, mem))
      return x, outs

    x, outs = body(self.groups, x, stacked_memory)
    records, new_memory = [], [None] * self.num_layers
    for gi in range(g):
      for j, (aux, mem) in enumerate(outs):
        layer = gi * p + j
        records.append((layer + 1, jax.tree.map(lambda a: a[gi], aux)))
        new_memory[layer] = None if mem is None else mem[gi]
    records.sort(key=lambda r: r[0])
    return x, records, new_memory
