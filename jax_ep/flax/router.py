"""Top-k routers as pure functions of arrays (they run per rank inside ``shard_map``, and in the dense
reference, so the two paths route identically).

Shapes: T tokens, E experts, K = top-k. All routing math is float32 whatever the activation dtype:
selection must not flip between bf16 and f32 runs of the same weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ROUTERS = ("softmax", "deepseek_v3")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Static routing configuration (hashable).

    Attributes:
      kind: ``"softmax"`` (softmax over E, then top-k) or ``"deepseek_v3"`` (sigmoid scores, group-limited
        top-k on ``score + bias``, weights from the unbiased scores).
      num_experts: E.
      topk: K.
      n_group / topk_group: DeepSeek-V3 group limit: experts split into ``n_group`` contiguous groups, a
        token picks its K experts inside its best ``topk_group`` groups (group score = sum of its 2 best
        biased scores). ``n_group=1`` disables the limit.
      routed_scaling_factor: multiplies the final weights.
      norm_topk_prob: renormalise the K selected weights to sum to 1 (None: True for deepseek_v3, False
        for softmax).
    """
    kind: str = "softmax"
    num_experts: int = 8
    topk: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool | None = None

    def __post_init__(self):
        if self.kind not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.kind!r}")
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk={self.topk} must be in [1, num_experts={self.num_experts}]")
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.n_group > 1 and self.topk > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError("topk exceeds the experts available in topk_group groups")

    @property
    def normalize(self) -> bool:
        return self.kind == "deepseek_v3" if self.norm_topk_prob is None else bool(self.norm_topk_prob)


def route(cfg: RouterConfig, logits, bias=None):
    """Select experts.

    Args:
      cfg: routing configuration.
      logits: ``[T, E]`` router logits (any float dtype; computed in f32).
      bias: ``[E]`` score-correction bias (deepseek_v3 only; selection only, gets no gradient).

    Returns:
      ``(topk_idx [T, K] int32, topk_weights [T, K] f32, probs [T, E] f32)``; ``probs`` are the per-token
      expert probabilities the load-balance loss uses (softmax; for sigmoid scores, scores / their sum).
    """
    logits = logits.astype(jnp.float32)
    if cfg.kind == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        choice = scores
        probs = scores
    else:
        scores = jax.nn.sigmoid(logits)
        choice = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        if cfg.n_group > 1:
            choice = _group_limit(cfg, choice)
    # Indices only: the weights come from the unbiased scores, so the bias never receives a gradient.
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(choice), cfg.topk)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = weights * jnp.float32(cfg.routed_scaling_factor)
    return idx.astype(jnp.int32), weights, probs


def _group_limit(cfg: RouterConfig, choice):
    """Mask (to -inf) the experts outside each token's ``topk_group`` best groups."""
    T, E = choice.shape
    grouped = choice.reshape(T, cfg.n_group, E // cfg.n_group)
    best = jax.lax.top_k(grouped, min(2, E // cfg.n_group))[0]
    group_score = jnp.sum(best, axis=-1)                                  # [T, n_group]
    _, keep = jax.lax.top_k(group_score, cfg.topk_group)
    keep_mask = jnp.any(keep[:, :, None] == jnp.arange(cfg.n_group)[None, None, :], axis=1)  # [T, n_group]
    masked = jnp.where(keep_mask[:, :, None], grouped, -jnp.inf)
    return masked.reshape(T, E)


def load_balance_loss(num_experts: int, topk: int, expert_counts, prob_sum, num_tokens):
    """Switch-style auxiliary loss ``E * sum_e f_e * P_e`` over the global batch.

    Args:
      expert_counts: ``[E]`` routed (token, k) entries per expert over the batch (no gradient).
      prob_sum: ``[E]`` sum over the batch's tokens of ``probs`` (carries the gradient).
      num_tokens: N, tokens in the batch (static).

    ``f_e = counts_e / (N K)`` (fraction of routed entries) and ``P_e = prob_sum_e / N`` (mean router
    probability); both sum to 1, so the loss is 1 for a perfectly uniform router and up to E when collapsed.
    """
    f = expert_counts.astype(jnp.float32) / jnp.float32(num_tokens * topk)
    p = prob_sum / jnp.float32(num_tokens)
    return jnp.float32(num_experts) * jnp.sum(jax.lax.stop_gradient(f) * p)


def update_bias(bias, expert_counts, rate: float = 1e-3):
    """DeepSeek-V3 auxiliary-loss-free balancing step: raise the bias of under-loaded experts and lower
    over-loaded ones by ``rate`` (sign of the deviation from the mean load). ``bias [E]``, counts ``[E]``."""
    load = expert_counts.astype(jnp.float32)
    return bias + jnp.float32(rate) * jnp.sign(jnp.mean(load) - load)
