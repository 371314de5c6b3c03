"""Flax NNX layers on jax_ep: an expert-parallel MoE (``MoE``), its routers, and a dense f32 reference.

Needs flax (``pip install jax-ep[flax]``); the core ``jax_ep`` package does not import this.
"""

from .moe import MODES, MoE, MoEConfig, RouterBias, dense_moe
from .router import ROUTERS, RouterConfig, load_balance_loss, route, update_bias

__all__ = ["MoE", "MoEConfig", "RouterBias", "dense_moe", "MODES", "RouterConfig", "ROUTERS", "route",
           "load_balance_loss", "update_bias"]
