"""Flax NNX mixture-of-experts layer on jax_ep dispatch / combine, and a dense f32 reference.

Parallel layout: the layer is called on a *global* activation ``[N, H]`` (or ``[B, S, H]``) and runs one
``jax.shard_map`` over the mesh. Tokens are split over ``data_axes + (ep_axis,)`` (each rank gets
``T = N / (dp * ep)`` tokens); routed-expert weights ``[E, H, F]`` / ``[E, F, H]`` are split over ``ep_axis``
(each rank holds E_loc = E / ep experts) and replicated over the data axes, so every dp slice is an
independent EP group. Router and shared experts are replicated.

Per rank (normal mode): route (f32) -> ``jax_ep.dispatch(layout="expert_major")`` -> SwiGLU with
``jax.lax.ragged_dot`` over the local expert groups -> ``jax_ep.combine`` weighted by the dispatched row
weights (so the router gets its gradient through combine and dispatch). Low-latency mode (decode):
``low_latency_dispatch`` -> per-expert batched SwiGLU on ``[E_loc, R*T_max, H]`` masked by ``count`` ->
``low_latency_combine`` (forward only on the CUDA backend: use it for inference).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep

from .router import RouterConfig, load_balance_loss, route

MODES = ("normal", "low_latency")


class RouterBias(nnx.Variable):
    """DeepSeek-V3 score-correction bias ``[E]``: used for expert selection only, never trained by the
    optimizer (it is not an ``nnx.Param``); update it with ``router.update_bias`` from the expert load."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Static (hashable) configuration of one MoE layer; see ``MoE`` for the meaning of the fields."""
    hidden: int
    ffn: int
    router: RouterConfig
    ep_axis: str
    token_axes: tuple[str, ...]
    num_token_shards: int
    mode: str
    expert_alignment: int
    capacity_factor: float | None
    max_recv_rows: int | None
    max_tokens_per_rank: int | None
    use_fp8: bool
    dtype: jnp.dtype
    precision: jax.lax.Precision | None
    backend: str | None
    ranks_per_node: int | None = None

    @property
    def num_experts(self):
        return self.router.num_experts

    @property
    def topk(self):
        return self.router.topk


@functools.lru_cache(maxsize=None)
def _buffer(mesh, axis, num_experts, hidden, max_tokens, topk, max_recv_rows, low_latency, backend,
            ranks_per_node=None):
    # One Buffer per distinct static config (on GPUs a Buffer owns communication memory: never rebuild it
    # per call or per trace).
    return jax_ep.Buffer(mesh, axis, num_experts=num_experts, hidden=hidden, max_tokens_per_rank=max_tokens,
                         num_topk=topk, max_recv_rows=max_recv_rows, low_latency=low_latency, backend=backend,
                         ranks_per_node=ranks_per_node)


def _expert_init(in_axis):
    # fan-in scaling per expert matrix: the leading axis is the stacked expert axis, not a fan dimension.
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=-1,
                                             batch_axis=(0,))


class MoE(nnx.Module):
    """Expert-parallel MoE FFN (routed SwiGLU experts + optional shared experts).

    Args:
      hidden: H. ffn: F, routed-expert intermediate size. num_experts: E (a multiple of the EP size).
      topk: K experts per token.
      mesh: a ``jax.sharding.Mesh`` holding ``ep_axis`` and ``data_axes``.
      rngs: ``nnx.Rngs`` for initialisation.
      ep_axis: mesh axis of the EP group (experts are split over it).
      data_axes: extra mesh axes the tokens are split over (independent EP groups); absent names are ignored.
      router: ``"softmax"`` or ``"deepseek_v3"``; n_group, topk_group, routed_scaling_factor,
        norm_topk_prob: see ``router.RouterConfig``.
      num_shared_experts / shared_ffn: dense SwiGLU of width ``num_shared_experts * (shared_ffn or ffn)``
        applied to every token and added to the routed output (0 = none).
      mode: ``"normal"`` (training / prefill) or ``"low_latency"`` (decode).
      max_tokens_per_rank: T_max of the jax_ep Buffer (None: the per-rank token count of each call).
      capacity_factor: expert-major receive capacity per rank = ceil(factor * T_max * K) rows (None: the
        worst case, never drops). Dropped (token, expert) rows are counted in ``aux["overflow"]``; call
        ``jax_ep.set_raise_on_overflow(True)`` to turn them into a run-time error. max_recv_rows: the same
        capacity given in rows (wins over capacity_factor).
      expert_alignment: pad each local expert group to this many rows (grouped-GEMM tile friendliness).
      use_fp8: low-latency dispatch payload in fp8 (e4m3 with per-128-channel scales); False = bf16.
      dtype: compute / payload dtype (float32 or bfloat16); param_dtype: storage dtype of the weights.
      precision: matmul precision of the expert and shared FFNs.
      backend: jax_ep backend (None = auto).
      ranks_per_node: ranks of one node (load/store peers); fewer than the EP size runs the normal mode's
        internode kernels (jax_ep.Buffer). Route with ``router="deepseek_v3"``, ``n_group`` = nodes and a small
        ``topk_group`` so that tokens cross to few nodes.

    Call: ``y, aux = moe(x)`` with ``x [N, H]`` or ``[B, S, H]`` (N divisible by the number of token
    shards); ``y`` has x's shape and ``dtype``. ``aux`` (all replicated unless noted):
      ``aux_loss []`` f32 switch-style load-balance loss over the global batch (``router.load_balance_loss``);
      ``expert_load [E]`` int32 routed (token, k) entries per expert over the global batch (before capacity);
      ``overflow []`` int32 items dispatch dropped for capacity, summed over all ranks (with the layer's
      buffers: (token, expert) rows past the expert-major capacity; 0 means nothing was lost);
      ``overflow_per_rank [dp*ep]`` int32 the same per receiving rank (mesh order of the token axes).
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, topk: int, *, mesh: jax.sharding.Mesh,
                 rngs: nnx.Rngs, ep_axis: str = "ep", data_axes: tuple[str, ...] = ("dp",),
                 router: str = "softmax", n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, norm_topk_prob: bool | None = None,
                 num_shared_experts: int = 0, shared_ffn: int | None = None, mode: str = "normal",
                 max_tokens_per_rank: int | None = None, capacity_factor: float | None = None,
                 max_recv_rows: int | None = None, expert_alignment: int = 1, use_fp8: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, precision=None, backend: str | None = None,
                 ranks_per_node: int | None = None):
        if mode not in MODES:
            raise ValueError(f"MoE: mode must be one of {MODES}, got {mode!r}")
        if ep_axis not in mesh.axis_names:
            raise ValueError(f"MoE: ep_axis {ep_axis!r} is not a mesh axis {mesh.axis_names}")
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"MoE: dtype must be float32 or bfloat16, got {dtype}")
        token_axes = tuple(a for a in data_axes if a in mesh.axis_names and a != ep_axis) + (ep_axis,)
        self.mesh = mesh
        self.config = MoEConfig(
            hidden=hidden, ffn=ffn,
            router=RouterConfig(kind=router, num_experts=num_experts, topk=topk, n_group=n_group,
                                topk_group=topk_group, routed_scaling_factor=float(routed_scaling_factor),
                                norm_topk_prob=norm_topk_prob),
            ep_axis=ep_axis, token_axes=token_axes,
            num_token_shards=math.prod(mesh.shape[a] for a in token_axes), mode=mode,
            expert_alignment=int(expert_alignment), capacity_factor=capacity_factor, max_recv_rows=max_recv_rows,
            max_tokens_per_rank=max_tokens_per_rank, use_fp8=bool(use_fp8), dtype=jnp.dtype(dtype),
            precision=precision, backend=backend, ranks_per_node=ranks_per_node)
        if ranks_per_node is not None and ranks_per_node < mesh.shape[ep_axis] and mode == "low_latency":
            raise ValueError("MoE: low-latency mode over several nodes is not built yet (ranks_per_node < EP size)")
        if num_experts % mesh.shape[ep_axis]:
            raise ValueError(f"MoE: num_experts={num_experts} is not divisible by the {mesh.shape[ep_axis]} "
                             f"ranks of axis {ep_axis!r}")

        def param(init, shape, names):
            return nnx.Param(nnx.with_partitioning(init, names, mesh=mesh)(rngs.params(), shape, param_dtype))

        E, H, F = num_experts, hidden, ffn
        self.router_kernel = param(nnx.initializers.normal(H ** -0.5), (H, E), (None, None))
        self.score_bias = (RouterBias(jax.device_put(jnp.zeros((E,), jnp.float32), NamedSharding(mesh, P())))
                           if router == "deepseek_v3" else None)
        expert = (ep_axis, None, None)
        self.w_gate = param(_expert_init(-2), (E, H, F), expert)
        self.w_up = param(_expert_init(-2), (E, H, F), expert)
        self.w_down = param(_expert_init(-2), (E, F, H), expert)
        Fs = num_shared_experts * (shared_ffn or ffn)
        if Fs:
            init = nnx.initializers.lecun_normal()
            self.shared_gate = param(init, (H, Fs), (None, None))
            self.shared_up = param(init, (H, Fs), (None, None))
            self.shared_down = param(init, (Fs, H), (None, None))
        else:
            self.shared_gate = self.shared_up = self.shared_down = None

    # -- parameters as plain arrays (what the shard_map body and the dense reference take) -----------------
    def arrays(self) -> dict:
        """``{name: array}`` of the layer's weights (and ``score_bias``), the input of ``dense_moe``."""
        names = ("router_kernel", "score_bias", "w_gate", "w_up", "w_down", "shared_gate", "shared_up",
                 "shared_down")
        return {n: getattr(self, n)[...] for n in names if getattr(self, n) is not None}

    def buffer(self, tokens_per_rank: int) -> jax_ep.Buffer:
        """The jax_ep Buffer this layer uses for calls with ``tokens_per_rank`` tokens per rank."""
        c = self.config
        t_max = c.max_tokens_per_rank or tokens_per_rank
        if tokens_per_rank > t_max:
            raise ValueError(f"MoE: {tokens_per_rank} tokens per rank exceed max_tokens_per_rank={t_max}")
        rows = c.max_recv_rows
        if rows is None and c.capacity_factor is not None:
            rows = max(1, math.ceil(c.capacity_factor * t_max * c.topk))
        return _buffer(self.mesh, c.ep_axis, c.num_experts, c.hidden, t_max, c.topk, rows,
                       c.mode == "low_latency", c.backend, c.ranks_per_node)

    def __call__(self, x):
        c = self.config
        if x.shape[-1] != c.hidden:
            raise ValueError(f"MoE: x must be [..., {c.hidden}], got {x.shape}")
        x2 = x.reshape(-1, c.hidden)
        if x2.shape[0] % c.num_token_shards:
            raise ValueError(f"MoE: {x2.shape[0]} tokens are not divisible by the {c.num_token_shards} token "
                             f"shards (mesh axes {c.token_axes})")
        buffer = self.buffer(x2.shape[0] // c.num_token_shards)
        params = self.arrays()
        tok = P(c.token_axes)
        specs = {n: P(c.ep_axis) if n in ("w_gate", "w_up", "w_down") else P() for n in params}
        body = functools.partial(_moe_shard, c, buffer)
        y, aux = jax.shard_map(
            body, mesh=self.mesh, in_specs=(tok, specs),
            out_specs=(tok, dict(aux_loss=P(), expert_load=P(), overflow_per_rank=tok)))(
                x2.astype(c.dtype), params)
        aux["overflow"] = jnp.sum(aux["overflow_per_rank"])
        return y.reshape(x.shape), aux


# -- per-rank body (inside shard_map) ---------------------------------------------------------------------

def _moe_shard(c: MoEConfig, buffer, x, p):
    """x ``[T, H]`` this rank's tokens; p: weights (routed experts already sliced to ``[E_loc, ...]``)."""
    T = x.shape[0]
    logits = jnp.dot(x.astype(jnp.float32), p["router_kernel"].astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    idx, w, probs = route(c.router, logits, p.get("score_bias"))

    # Load statistics over the global batch: the layout's per-expert counts summed over every token shard.
    layout = jax_ep.get_dispatch_layout(idx, c.num_experts, num_ranks=buffer.num_ranks, backend=buffer.backend)
    load = jax.lax.psum(layout.num_tokens_per_expert, c.token_axes)
    prob_sum = jax.lax.psum(jnp.sum(probs, axis=0), c.token_axes)
    aux_loss = load_balance_loss(c.num_experts, c.topk, load, prob_sum, T * c.num_token_shards)

    if c.mode == "normal":
        y, overflow = _routed_normal(c, buffer, x, idx, w, p)
    else:
        y, overflow = _routed_low_latency(c, buffer, x, idx, w, p)
    if "shared_gate" in p:
        y = y.astype(jnp.float32) + _swiglu_dense(c, x, p["shared_gate"], p["shared_up"], p["shared_down"])
    return y.astype(c.dtype), dict(aux_loss=aux_loss, expert_load=load, overflow_per_rank=overflow.reshape(1))


def _routed_normal(c: MoEConfig, buffer, x, idx, w, p):
    d = jax_ep.dispatch(buffer, x, idx, w, expert_alignment=c.expert_alignment, layout="expert_major")
    dt, f32 = c.dtype, jnp.float32

    def gmm(a, b):  # grouped GEMM over the local experts' row groups; f32 accumulation
        return jax.lax.ragged_dot(a.astype(dt), b.astype(dt), d.group_sizes, precision=c.precision,
                                  preferred_element_type=f32)

    h = (jax.nn.silu(gmm(d.x, p["w_gate"])) * gmm(d.x, p["w_up"])).astype(dt)
    out = gmm(h, p["w_down"]).astype(dt)
    # Passing the dispatched row weights (not the handle's saved copy) makes combine differentiable in them,
    # and dispatch's VJP carries that gradient back to the [T, K] router weights.
    y = jax_ep.combine(buffer, out, d.handle, topk_weights=d.topk_weights)
    return y, d.overflow


def _routed_low_latency(c: MoEConfig, buffer, x, idx, w, p):
    d = jax_ep.low_latency_dispatch(buffer, x.astype(jnp.bfloat16), idx, use_fp8=c.use_fp8)
    xe = jax_ep.per_token_cast_back(d.x, d.x_scales, out_dtype=c.dtype) if c.use_fp8 else d.x
    dt, f32 = c.dtype, jnp.float32

    def bmm(a, b):  # [E_loc, S, in] x [E_loc, in, out]: one batched GEMM over the local experts
        return jnp.einsum("esi,eio->eso", a.astype(dt), b.astype(dt), precision=c.precision,
                          preferred_element_type=f32)

    h = (jax.nn.silu(bmm(xe, p["w_gate"])) * bmm(xe, p["w_up"])).astype(dt)
    out = bmm(h, p["w_down"])
    valid = jnp.arange(out.shape[1])[None, :] < d.count[:, None]           # [E_loc, S]
    out = jnp.where(valid[:, :, None], out, 0.0).astype(jnp.bfloat16)
    y = jax_ep.low_latency_combine(buffer, out, idx, w, d.handle)
    return y, jnp.zeros((), jnp.int32)  # the low-latency buffers hold the worst case: nothing is dropped


def _swiglu_dense(c: MoEConfig, x, wg, wu, wd):
    dt, f32 = c.dtype, jnp.float32
    g = jnp.dot(x.astype(dt), wg.astype(dt), precision=c.precision, preferred_element_type=f32)
    u = jnp.dot(x.astype(dt), wu.astype(dt), precision=c.precision, preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(dt)
    return jnp.dot(h, wd.astype(dt), precision=c.precision, preferred_element_type=f32)


# -- dense reference --------------------------------------------------------------------------------------

def dense_moe(config: MoEConfig, params: dict, x, keep=None):
    """Dense f32 oracle: every token through every expert, then the top-k weighted sum.

    Args:
      config: ``MoE.config``; params: ``MoE.arrays()`` (full, unsharded ``[E, ...]`` expert weights).
      x: ``[..., H]``. keep: optional ``[N, K]`` bool, False for (token, k) entries to leave out (e.g. the
        ones a small capacity dropped).

    Returns ``(y [..., H] f32, topk_idx [N, K], topk_weights [N, K])``. Same routing function as the layer.
    """
    f32, hi = jnp.float32, jax.lax.Precision.HIGHEST
    xf = x.reshape(-1, config.hidden).astype(f32)
    logits = jnp.dot(xf, params["router_kernel"].astype(f32), precision=hi)
    idx, w, _ = route(config.router, logits, params.get("score_bias"))
    if keep is not None:
        w = jnp.where(keep, w, 0.0)
    combine_w = jnp.sum(jax.nn.one_hot(idx, config.num_experts, dtype=f32) * w[..., None], axis=1)   # [N, E]
    g = jnp.einsum("nh,ehf->nef", xf, params["w_gate"].astype(f32), precision=hi)
    u = jnp.einsum("nh,ehf->nef", xf, params["w_up"].astype(f32), precision=hi)
    out = jnp.einsum("nef,efh->neh", jax.nn.silu(g) * u, params["w_down"].astype(f32), precision=hi)
    y = jnp.einsum("ne,neh->nh", combine_w, out, precision=hi)
    if "shared_gate" in params:
        sg, su, sd = (params[n].astype(f32) for n in ("shared_gate", "shared_up", "shared_down"))
        y = y + jnp.dot(jax.nn.silu(jnp.dot(xf, sg, precision=hi)) * jnp.dot(xf, su, precision=hi), sd,
                        precision=hi)
    return y.reshape(x.shape[:-1] + (config.hidden,)), idx, w
