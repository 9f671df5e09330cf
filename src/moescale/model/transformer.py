"""The decoder-only language model that holds any FFN family, and its Transformer-XL variant.

    x = embed(tokens) · sqrt(d)  [+ absolute positions]                 [batch, length, d_model]
    for each block:  x = x + Attn(LN(x));  x = x + FFN(LN(x))            pre-LayerNorm
    logits = LN(x) @ embed^T  (or a separate output projection)          [batch, length, vocab]

The model never names an FFN family: `ffn` and `sparse_ffn` are constructors called as
`ffn(d_model=d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)` (e.g.
`functools.partial(DenseFFN, d_ff=3072)`: the model's precision reaches every sublayer), and
the sublayers' auxiliary losses and routing metrics are collected by running each block under
`nnx.capture(block, AuxLoss, RoutingMetric)`. Capturing per block (not around the whole
forward) is what lets the same code run under `nnx.remat` and `nnx.scan`: the records leave
each block as ordinary outputs. Consequently do not wrap the model itself in `nnx.capture`:
everything recorded is already in `LMOutput`.

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

import functools
import math
from typing import Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moescale import sharding as shd
from moescale.layers import common
from moescale.model import attention as attention_lib
from moescale.model import positions as positions_lib

POSITIONS = ('sinusoidal', 'learned', 'rotary', 'relative')
DEFAULT_AUX_LOSS_WEIGHTS = {'load_balance': 0.01, 'router_z': 0.0, 'entropy': 0.0}
FFNConstructor = Callable[..., nnx.Module]
# The residual stream [batch, length, d_model]: split over the data axes only. Pinning it at
# every block boundary (t5x / MaxText do the same) keeps GSPMD from carrying a tensor- or
# FSDP-split layout of one layer's output into the next layer's LayerNorm.
ACT_RESIDUAL = ('act_batch', 'act_length', 'act_embed')


@flax.struct.dataclass
class LMOutput:
  """What one forward pass returns (a pytree: safe to return from `jax.jit`).

  logits: [batch, length, vocab] float32 (float64 if the compute dtype is).
  aux_loss: scalar, Σ_name weight[name] · aux_losses[name]; add it to the LM loss.
  aux_losses: name -> scalar, the unweighted recorded losses summed over layers.
  metrics: 'layer_02/expert_usage' -> array, every recorded routing metric by 1-based layer.
  memory: Transformer-XL memory for the next segment (list per layer) or None.
  """
  logits: jax.Array
  aux_loss: jax.Array
  aux_losses: dict[str, jax.Array]
  metrics: dict[str, jax.Array]
  memory: list[jax.Array] | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis; x: [..., d], scale,
  bias: [d]. The VJP is written out: autodiff of the three-pass form (mean, variance about
  it, normalise) emits twice the passes over [..., d] (fwd+bwd of [4, 128, 128] on XLA:CPU:
  568 us autodiff, 427 us this; 9 norms per microbatch in the bench's 4-layer models).

    dx = r (g - mean(g) - xh mean(g xh)),  g = dy scale,  xh = (x - mean) r,  r = 1/std
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  xc = x - x.mean(-1, keepdims=True)
  r = jax.lax.rsqrt(jnp.square(xc).mean(-1, keepdims=True) + eps)
  xh = xc * r
  return xh * scale + bias, (xh, r, scale)


def _layer_norm_bwd(eps, res, dy):
  del eps
  xh, r, scale = res
  g = dy * scale
  dx = r * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
  batch_axes = tuple(range(dy.ndim - 1))
  return dx, (dy * xh).sum(batch_axes), dy.sum(batch_axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over d_model in float32, scale and bias with logical axis 'norm'."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = common.param(rngs, nnx.initializers.ones, (dim,), ('norm',), param_dtype)
    self.bias = common.param(rngs, nnx.initializers.zeros, (dim,), ('norm',), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm(x.astype(jnp.float32), self.scale[...].astype(jnp.float32),
                   self.bias[...].astype(jnp.float32), self.eps)
    return y.astype(self.dtype)


class Block(nnx.Module):
  """One pre-LN decoder block: x + Attn(LN(x)), then x + FFN(LN(x)); dropout on both outputs."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int | None, ffn: FFNConstructor,
               *, positions: str, use_bias: bool, dropout: float, attention_dropout: float,
               layernorm_eps: float, dtype, param_dtype, rngs: nnx.Rngs,
               attention_kernels: str = 'auto'):
    norm = dict(eps=layernorm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    attn = dict(use_bias=use_bias, dropout=attention_dropout, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs)
    self.attention_norm = LayerNorm(d_model, **norm)
    if positions == 'relative':
      self.attention = attention_lib.RelativeAttention(d_model, num_heads, head_dim, **attn)
    else:
      self.attention = attention_lib.Attention(d_model, num_heads, head_dim,
                                               rotary=positions == 'rotary',
                                               kernels=attention_kernels, **attn)
    self.ffn_norm = LayerNorm(d_model, **norm)
    # The model's precision governs every sublayer: one `dtype` switches the whole LM to bf16
    # compute (routers and scoring stay float32 inside the families).
    self.ffn = ffn(d_model=d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout_rate = dropout
    self.rngs = rngs if dropout > 0 else None

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None,
               positions: jax.Array | None, memory: jax.Array | None,
               deterministic: bool) -> jax.Array:
    h = self.attention_norm(x)
    if memory is None:
      a = self.attention(h, segment_ids=segment_ids, positions=positions,
                         deterministic=deterministic)
    else:
      a = self.attention(h, segment_ids=segment_ids, positions=positions,
                         memory=self.attention_norm(memory), deterministic=deterministic)
    x = x + common.dropout(a, self.dropout_rate, deterministic, self.rngs).astype(x.dtype)
    x = shd.constrain(x, ACT_RESIDUAL)
    y = self.ffn(self.ffn_norm(x), deterministic=deterministic, segment_ids=segment_ids)
    x = x + common.dropout(y, self.dropout_rate, deterministic, self.rngs).astype(x.dtype)
    return shd.constrain(x, ACT_RESIDUAL)


class _BlockGroup(nnx.Module):
  """The repeating run of blocks that `scan_layers` stacks (e.g. one dense + one sparse)."""

  def __init__(self, ffns: Sequence[FFNConstructor], block_kwargs: dict, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(ffn=f, rngs=rngs, **block_kwargs) for f in ffns])


def sparse_layer_numbers(sparse_layers: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
  """The 1-based layer numbers that carry the sparse FFN."""
  if isinstance(sparse_layers, str):
    if sparse_layers == 'every_other':  # fairseq's moe_freq=2: layers 2, 4, 6, ...
      return tuple(range(2, num_layers + 1, 2))
    if sparse_layers == 'all':
      return tuple(range(1, num_layers + 1))
    if sparse_layers == 'none':
      return ()
    raise ValueError(f"sparse_layers={sparse_layers!r}: valid strings are 'every_other', "
                     f"'all', 'none', or pass a list of layer numbers in [1, {num_layers}]")
  numbers = tuple(sparse_layers)
  for n in numbers:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= num_layers:
      raise ValueError(f'sparse_layers entry {n!r} is not a layer number: layers are numbered '
                       f'from 1 to num_layers={num_layers}')
  if len(set(numbers)) != len(numbers):
    raise ValueError(f'sparse_layers={list(numbers)} repeats a layer')
  return tuple(sorted(numbers))


def _period(pattern: Sequence[bool]) -> int:
  """Smallest p dividing len(pattern) with pattern[i] == pattern[i % p]."""
  n = len(pattern)
  for p in range(1, n + 1):
    if n % p == 0 and all(pattern[i] == pattern[i % p] for i in range(n)):
      return p
  return n


def _flatten_records(state: nnx.State) -> dict[tuple[str, ...], tuple]:
  """Captured State -> {path inside the block (as strings): tuple of recorded values}."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    out[tuple(str(p) for p in path)] = tuple(value) if isinstance(value, tuple) else (value,)
  return out


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
    dropout: on embeddings and on both sublayer outputs; attention_dropout: on attention
      probabilities. (Dropout inside the FFN is the FFN constructor's business.)
    use_bias: biases in the attention projections.
    attention_kernels: what computes softmax(q k^T) v ('auto', 'xla', 'cpu'; see
      model.attention_kernels). Transformer-XL's relative attention always uses XLA's ops.
    aux_loss_weights: name -> weight of recorded auxiliary losses. A recorded name missing
      here raises a ValueError at trace time rather than being silently ignored; give it
      weight 0.0 to log it without training on it.
    remat: rematerialise each block in the backward pass (nnx.remat).
    scan_layers: stack the repeating run of blocks and run it with nnx.scan. Use it for
      training under jit: compile time stays flat in depth (XLA:CPU, fwd+bwd of a tiny
      model, CPU seconds: 5 at 2 layers and 8 at 16, against 5 -> 49 looped). Off by default
      because the looped model is the friendlier one outside jit: each eager call of a
      scanned model re-traces and compiles its scan, and its parameters carry a leading
      'layers' axis (logical name 'layers', which sharding rules should map to None).
    dtype: compute dtype; param_dtype: storage dtype. Logits are returned in float32 (or
      float64 when dtype is).
  """

  def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               head_dim: int | None = None, *, ffn: FFNConstructor,
               sparse_ffn: FFNConstructor | None = None,
               sparse_layers: str | Sequence[int] = 'every_other',
               positions: str = 'sinusoidal', max_length: int = 2048, mem_len: int = 0,
               scale_embeddings: bool = True, tie_embeddings: bool = True,
               dropout: float = 0.0, attention_dropout: float = 0.0, use_bias: bool = True,
               layernorm_eps: float = 1e-5, attention_kernels: str = 'auto',
               aux_loss_weights: dict[str, float] | None = None,
               remat: bool = False, scan_layers: bool = False,
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
    sparse = sparse_layer_numbers(sparse_layers, num_layers) if sparse_ffn is not None else ()
    self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_layers
    self.positions = positions
    self.mem_len = mem_len
    self.scale_embeddings = scale_embeddings
    self.sparse_layers = sparse
    self.dropout_rate = dropout
    self.aux_loss_weights = tuple(sorted(
        (DEFAULT_AUX_LOSS_WEIGHTS if aux_loss_weights is None else aux_loss_weights).items()))
    self.remat, self.scan_layers = remat, scan_layers
    self.dtype = dtype

    # fairseq's Embedding init N(0, d^-1/2): with the sqrt(d) scale, inputs start at unit size.
    self.embed = common.param(rngs, common.normal(d_model ** -0.5), (vocab_size, d_model),
                              ('vocab', 'embed'), param_dtype)
    self.position_table = (positions_lib.LearnedPositions(
        max_length, d_model, param_dtype=param_dtype, rngs=rngs)
                           if positions == 'learned' else None)
    block_kwargs = dict(d_model=d_model, num_heads=num_heads, head_dim=head_dim,
                        positions=positions, use_bias=use_bias, dropout=dropout,
                        attention_dropout=attention_dropout, layernorm_eps=layernorm_eps,
                        attention_kernels=attention_kernels, dtype=dtype,
                        param_dtype=param_dtype)
    ffns = [sparse_ffn if i in sparse else ffn for i in range(1, num_layers + 1)]
    if scan_layers:
      period = _period([i in sparse for i in range(1, num_layers + 1)])
      self.period, self.num_groups = period, num_layers // period

      # Each group gets its own keys (a new Rngs split num_groups ways, stacked like the
      # parameters) and keeps them for dropout; the model's own rngs object is not captured.
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make_groups(group_rngs):
        return _BlockGroup(ffns[:period], block_kwargs, group_rngs)

      self.groups = make_groups(rngs.split(self.num_groups))
      self.blocks = None
    else:
      self.period, self.num_groups = 1, num_layers
      self.groups = None
      self.blocks = nnx.List([Block(ffn=f, rngs=rngs, **block_kwargs) for f in ffns])
    self.final_norm = LayerNorm(d_model, eps=layernorm_eps, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
    self.unembed = (None if tie_embeddings else common.param(
        rngs, common.normal(d_model ** -0.5), (d_model, vocab_size), ('embed', 'vocab'),
        param_dtype))
    self.rngs = rngs if dropout > 0 else None

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
               mem_len: int | None = None) -> LMOutput:
    """tokens: [batch, length] int -> LMOutput.

    segment_ids, positions: [batch, length] int from seqio's packing (0 = padding; positions
      restart at 0 per segment). Without positions they are derived from segment_ids (or
      0..length-1). Attention never crosses a segment boundary.
    memory: Transformer-XL memory from the previous call's `LMOutput.memory` (a list, one
      [batch, mem, d_model] per layer; any mem length, e.g. longer at evaluation).
    mem_len: how much new memory to return; defaults to the constructor's mem_len (pass a
      larger value at evaluation to keep several segments, as Csordás et al. do at test time).
    """
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be [batch, length], got shape {tokens.shape}')
    batch, length = tokens.shape
    mem_len = self.mem_len if mem_len is None else mem_len
    if self.positions != 'relative' and (memory is not None or mem_len):
      raise ValueError(f"memory needs positions='relative', not {self.positions!r}")
    if memory is not None:
      memory = list(memory)
      if len(memory) != self.num_layers:
        raise ValueError(f'memory has {len(memory)} entries; need one per layer '
                         f'({self.num_layers})')
      # The memory is a constant: no gradient reaches the previous segment (Dai et al.).
      memory = [jax.lax.stop_gradient(m) for m in memory]
    if positions is None:
      positions = (positions_lib.positions_from_segments(segment_ids)
                   if segment_ids is not None
                   else jnp.broadcast_to(jnp.arange(length), (batch, length)))

    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    if self.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(self.d_model), self.dtype)
    if self.positions == 'sinusoidal':
      x = x + positions_lib.sinusoidal_embedding(positions, self.d_model, self.dtype)
    elif self.positions == 'learned':
      if length > self.position_table.max_length:
        raise ValueError(f'length {length} exceeds max_length={self.position_table.max_length}')
      x = x + self.position_table(positions).astype(self.dtype)
    x = common.dropout(x, self.dropout_rate, deterministic, self.rngs)
    x = shd.constrain(x, ACT_RESIDUAL)

    run = self._run_scanned if self.scan_layers else self._run_looped
    x, records, new_memory = run(x, segment_ids, positions, memory, mem_len, deterministic)

    x = self.final_norm(x)
    if self.unembed is None:
      logits = jnp.einsum('bld,vd->blv', x, self.embed[...].astype(self.dtype))
    else:
      logits = jnp.einsum('bld,dv->blv', x, self.unembed[...].astype(self.dtype))
    logits = shd.constrain(logits, ('act_batch', 'act_length', 'act_vocab'))
    aux_losses, aux_loss, metrics = self._collect(records)
    # float32 at least (bfloat16 logits lose the loss), float64 kept for gradient checks.
    logits = logits.astype(jnp.promote_types(self.dtype, jnp.float32))
    return LMOutput(logits=logits, aux_loss=aux_loss,
                    aux_losses=aux_losses, metrics=metrics,
                    memory=new_memory if mem_len else None)

  def _block_fn(self, segment_ids, positions, mem_len, deterministic):
    """block, x, memory -> (x, losses, metrics, new memory); remat-wrapped if asked."""

    def step(block: Block, x: jax.Array, memory: jax.Array | None):
      # nnx.capture marks every module it runs with an attribute. Marking a shallow copy
      # (new module objects, the same Variables) instead of `block` keeps a stateless call
      # free of mutation, so the model also works inside a plain jax.jit / jax.grad closure;
      # stateful sublayers (dropout counters, batch statistics) still update the originals.
      block = nnx.merge(*nnx.split(block))
      captured = nnx.capture(block, common.AuxLoss, common.RoutingMetric)
      y, losses, metrics = captured(x, segment_ids=segment_ids, positions=positions,
                                    memory=memory, deterministic=deterministic)
      new_memory = None
      if mem_len:
        context = x if memory is None else jnp.concatenate([memory.astype(x.dtype), x], 1)
        new_memory = jax.lax.stop_gradient(context[:, -mem_len:])
      return y, _flatten_records(losses), _flatten_records(metrics), new_memory

    return nnx.remat(step) if self.remat else step

  def _run_looped(self, x, segment_ids, positions, memory, mem_len, deterministic):
    step = self._block_fn(segment_ids, positions, mem_len, deterministic)
    records, new_memory = [], []
    for i, block in enumerate(self.blocks):
      x, losses, metrics, mem = step(block, x, None if memory is None else memory[i])
      records.append((i + 1, losses, metrics))
      new_memory.append(mem)
    return x, records, new_memory

  def _run_scanned(self, x, segment_ids, positions, memory, mem_len, deterministic):
    step = self._block_fn(segment_ids, positions, mem_len, deterministic)
    p, g = self.period, self.num_groups
    # [layers, ...] -> [groups, period, ...]: layer n = group·period + j (0-based).
    stacked_memory = (None if memory is None else
                      jnp.stack(memory).reshape((g, p) + memory[0].shape))

    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def body(group, x, group_memory):
      outs = []
      for j, block in enumerate(group.blocks):
        x, losses, metrics, mem = step(block, x,
                                       None if group_memory is None else group_memory[j])
        outs.append((losses, metrics, mem))
      return x, outs

    x, outs = body(self.groups, x, stacked_memory)
    records, new_memory = [], [None] * self.num_layers
    for gi in range(g):
      for j, (losses, metrics, mem) in enumerate(outs):
        layer = gi * p + j
        take = lambda tree: jax.tree.map(lambda a: a[gi], tree)
        records.append((layer + 1, take(losses), take(metrics)))
        new_memory[layer] = None if mem is None else mem[gi]
    records.sort(key=lambda r: r[0])
    return x, records, new_memory

  def _collect(self, records) -> tuple[dict, jax.Array, dict]:
    """Per-layer records -> (aux_losses summed over layers, weighted total, flat metrics)."""
    weights = dict(self.aux_loss_weights)
    aux_losses: dict[str, jax.Array] = {}
    metrics: dict[str, jax.Array] = {}
    for layer, losses, layer_metrics in records:
      for path, values in losses.items():
        name = path[-1]
        for v in values:
          v = jnp.asarray(v, jnp.float32)
          if v.ndim:
            raise ValueError(f'auxiliary loss {name!r} of layer {layer} must be a scalar, '
                             f'got shape {v.shape}')
          aux_losses[name] = aux_losses.get(name, 0.0) + v
      for path, values in layer_metrics.items():
        # Paths are relative to the block; drop the leading 'ffn' so the usual key reads
        # 'layer_02/expert_usage', while attention or nested records stay distinguishable.
        key = '/'.join(path[1:] if path[0] == 'ffn' else path)
        metrics[f'layer_{layer:02d}/{key}'] = values[0] if len(values) == 1 else jnp.stack(
            values)
    unknown = sorted(set(aux_losses) - set(weights))
    if unknown:
      raise ValueError(f'auxiliary losses {unknown} were recorded but have no weight in '
                       f'aux_loss_weights={weights}; add them (0.0 to only log them)')
    aux_loss = jnp.zeros((), jnp.float32)
    for name, value in aux_losses.items():
      aux_loss = aux_loss + weights[name] * value
    return aux_losses, aux_loss, metrics
