"""What every FFN family shares: parameters with logical axes, activations, and the aux contract.

Logical axis names (mapped to mesh axes by `moescale.sharding` rules; t5x/flaxformer spelling):

    embed     d_model                      mlp       d_ff, expert_size, PKM k_dim
    expert    num_experts                  vocab     vocabulary
    heads     attention / PKM heads        kv        per-head feature dim
    keys      PKM sub-keys (num_keys)      values    PKM value rows (num_keys**2)
    norm      LayerNorm scales/biases      length    sequence positions (learned positions)

The sublayer contract. Every FFN family is built as `Family(d_model, <its hyperparameters>,
dtype=..., param_dtype=..., rngs=...)` and called as

    y, aux = layer(x, deterministic=..., segment_ids=...)     x, y: [batch, length, d_model]

`aux` is an `Aux`: the family's auxiliary losses *already weighted* by its own loss weights
(e.g. `TopKMoE(load_balance_weight=0.01)`), which the model adds to the LM loss as they are, and
its metrics (unweighted losses, expert usage, ...), for logging only. The model and the trainer
only sum and log what they are given: neither names a family or a loss. `cost()` reports the
per-token FLOPs and active parameters for accounting.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Initializer = Callable[..., Array]


@dataclasses.dataclass(frozen=True)
class Cost:
  """What one token costs in a sublayer's forward pass; every family reports it via `cost()`.

  flops: forward FLOPs per token by component (2 per multiply-accumulate; element-wise work
    such as activations and softmax is not counted, as in Kaplan et al. and Megatron), e.g.
    {'router': 2*d*E, 'experts': 2*k*3... }. Keys are free-form names a report can group by.
  active_params: parameters a token touches (a router's whole matrix, only its k experts).
  category: where a report groups this sublayer's FLOPs and parameters ('ffn' by default; a
    family may name its own: ProductKeyMemory reports 'pkm').
  The total parameter count is not here: accounting reads it from the abstract parameter tree.
  """
  flops: Mapping[str, float]
  active_params: int
  category: str = 'ffn'

  @property
  def total_flops(self) -> float:
    return float(sum(self.flops.values()))


class Aux(NamedTuple):
  """What a sublayer returns beside its output; a pytree, so it crosses jit, grad and scan.

  losses: name -> scalar, weighted by the sublayer's own loss weights (0-weight losses left
    out): the model adds their sum to the LM loss.
  metrics: name -> scalar or small vector, for logging only.
  batch_stats: name -> array, sums over this call's tokens that add up across microbatches,
    for a loss defined over the whole batch (σ-MoE's entropy of the batch-mean router
    distribution). A sublayer that reports them also has `batch_losses(stats) -> losses` (the
    part of `losses` they give): when a training step splits its batch, it sums every
    microbatch's statistics first and takes those losses, and their gradient, of the whole
    batch (moescale.train.step). Empty for losses that are per token or per routing group.
  """
  losses: Mapping[str, Array]
  metrics: Mapping[str, Array]
  batch_stats: Mapping[str, Array] = {}


def no_aux() -> Aux:
  """The Aux of a sublayer without auxiliary losses or metrics (a dense FFN)."""
  return Aux({}, {})


def weighted(weights: Mapping[str, float], **losses: Array) -> dict[str, Array]:
  """{name: weight * loss} for the losses whose weight is not 0 (a Python float: the set of
  names is static, so the same model always returns the same pytree)."""
  return {name: weights[name] * value for name, value in losses.items() if weights[name]}


def param(
    rngs: nnx.Rngs,
    initializer: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
  """A parameter with logical axis names, one per dimension.

  Sharding is *not* applied at creation (eager_sharding=False): the trainer creates the whole
  model inside `jax.jit` with out_shardings from these names, so nothing is materialised on one
  device first, and a layer built by hand in a notebook needs no mesh at all.
  """
  if len(names) != len(shape):
    raise ValueError(f'logical names {tuple(names)} do not match shape {tuple(shape)}')
  return nnx.Param(
      initializer(rngs.params(), tuple(shape), dtype),
      out_sharding=tuple(names),
      eager_sharding=False,
  )


def normal(stddev: float) -> Initializer:
  return nnx.initializers.normal(stddev=stddev)


def fan_in_normal(fan_in: int, scale: float = 1.0) -> Initializer:
  """N(0, scale**2 / fan_in): what Csordás et al. call standard init, with scale = c."""
  return nnx.initializers.normal(stddev=scale / float(fan_in) ** 0.5)


def depth_scale(num_layers: int, gain: float = 1.0) -> float:
  """c = sqrt(2·gain / num_layers): Csordás et al.'s init scale for a pre-LN stack.

  Their code starts every linear layer of a block at N(0, c²/fan_in) (attention, the dense FFN,
  the σ-MoE's experts and router); their Switch baseline multiplies c² by an extra gain of 0.1.
  gin: `INIT_SCALE = @depth_scale()` with `depth_scale.num_layers = %NUM_LAYERS`.
  """
  check_positive(num_layers=num_layers)
  if not gain > 0:
    raise ValueError(f'gain={gain!r} must be > 0')
  return (2.0 * gain / num_layers) ** 0.5


def uniform(bound: float) -> Initializer:
  """U(-bound, bound): PyTorch's default for a Linear's weight and bias is bound 1/sqrt(fan_in)."""
  init = nnx.initializers.uniform(scale=2.0 * bound)
  return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) - jnp.asarray(bound, dtype)


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'relu': jax.nn.relu,
    # fairseq's and Megatron's GELU is the exact erf form, not the tanh approximation.
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'silu': jax.nn.silu,
}


def activation_fn(name: str) -> Callable[[Array], Array]:
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f'unknown activation {name!r}; valid: {sorted(_ACTIVATIONS)}') from None


def activation_name(fn: Callable[[Array], Array]) -> str | None:
  """The name under which `activation_fn` gives `fn`; None for any other callable (kernels
  that implement the named activations themselves check this, and fall back otherwise)."""
  if fn is jax.nn.gelu:  # called with one argument it is the tanh form
    return 'gelu_tanh'
  return next((name for name, f in _ACTIVATIONS.items() if f is fn), None)


def dropout(x: Array, rate: float, deterministic: bool, rngs: nnx.Rngs | None) -> Array:
  """Inverted dropout; `rngs.dropout()` supplies the key. No-op when deterministic or rate 0."""
  if deterministic or rate <= 0.0:
    return x
  if rngs is None:
    raise ValueError('dropout > 0 in training needs rngs with a "dropout" stream')
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def check_positive(**values: int | float) -> None:
  """Raises a ValueError naming every non-positive hyperparameter."""
  bad = {k: v for k, v in values.items() if not v > 0}
  if bad:
    raise ValueError(', '.join(f'{k}={v!r} must be > 0' for k, v in bad.items()))


def check_routing(num_experts: int, top_k: int, **sizes: int) -> None:
  """Shared by the MoE families: positive sizes, and top_k no larger than num_experts."""
  check_positive(num_experts=num_experts, top_k=top_k, **sizes)
  if top_k > num_experts:
    raise ValueError(f'top_k={top_k!r} must be <= num_experts={num_experts}')


def token_mask(segment_ids: Array | None, shape: Sequence[int]) -> Array:
  """[batch, length] bool: True for real tokens (segment id != 0, as seqio packs)."""
  if segment_ids is None:
    return jnp.ones(tuple(shape), dtype=bool)
  if tuple(segment_ids.shape) != tuple(shape):
    raise ValueError(
        f'segment_ids shape {tuple(segment_ids.shape)} must be [batch, length] = {tuple(shape)}')
  return segment_ids != 0


def router_logits(x: Array, w_router: Array) -> Array:
  """x: [t, d], w_router: [d, e] -> logits [t, e] in float32 (float64 if x is float64).

  Routers compute in (at least) float32: top-k / argmax on bfloat16 logits ties and flips
  experts. Every routed family (top-k MoE, σ-MoE) scores with this.
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.einsum('td,de->te', x.astype(dtype), w_router.astype(dtype))
