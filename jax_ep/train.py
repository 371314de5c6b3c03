"""Train a small MoE transformer LM with expert-parallel FFNs (``python -m jax_ep train``).

Character-level language model on text generated from a small deterministic grammar (learnable: words are
spelled the same way every time and sentences follow a fixed template). Layers: token + position embedding,
``--layers`` x [RMSNorm -> causal self-attention -> RMSNorm -> ``jax_ep.flax.MoE``], RMSNorm, head tied to
the embedding. Optimiser: optax AdamW with warmup + cosine decay. The mesh is ``dp x ep`` over all devices
(8 virtual CPU devices when ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; GPUs when present).

Prints the loss every ``--log-every`` steps, then tokens/s and the share of step time spent in
dispatch/combine; ``main()`` returns those metrics as a dict.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep
from jax_ep.flax import MoE, update_bias

# -- corpus ---------------------------------------------------------------------------------------------

_NOUNS = ["cat", "dog", "bird", "king", "queen", "farmer", "child", "horse", "river", "garden", "lamp",
          "sailor", "baker", "tree", "stone", "castle"]
_ADJS = ["old", "small", "red", "quiet", "happy", "tall", "green", "brave"]
_VERBS = ["sees", "likes", "follows", "finds", "helps", "watches", "calls", "paints"]
_PLACES = ["in the garden", "by the river", "at night", "near the castle", "under the tree", "before dawn"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def make_corpus(num_chars: int = 200_000, seed: int = 0) -> str:
    """Sentences from a fixed grammar (+ counting runs), deterministic for a seed. Entropy is low once
    words are known, so a small model's loss falls well below the ~3.4 nats of a uniform guess."""
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731

    def noun_phrase():
        adj = pick(_ADJS) + " " if rng.random() < 0.4 else ""
        return pick(["the ", "a ", "my "]) + adj + pick(_NOUNS)

    parts, n = [], 0
    while n < num_chars:
        if rng.random() < 0.15:  # counting runs: fully predictable after the first word
            start = int(rng.integers(0, 5))
            s = "count " + " ".join(_NUMBERS[start:start + int(rng.integers(3, 6))]) + ".\n"
        else:
            s = f"{noun_phrase()} {pick(_VERBS)} {noun_phrase()}"
            s += (" " + pick(_PLACES) if rng.random() < 0.5 else "") + ".\n"
        parts.append(s)
        n += len(s)
    return "".join(parts)


class CharData:
    """Random windows of ``seq + 1`` characters of the corpus as int32 token ids."""

    def __init__(self, text: str, seed: int = 0):
        self.vocab = sorted(set(text))
        self.ids = np.array([self.vocab.index(ch) for ch in text], np.int32)
        self.rng = np.random.default_rng(seed + 1)

    def batch(self, batch: int, seq: int) -> np.ndarray:
        start = self.rng.integers(0, len(self.ids) - seq - 1, size=batch)
        return np.stack([self.ids[s:s + seq + 1] for s in start])


# -- model ----------------------------------------------------------------------------------------------

class Attention(nnx.Module):
    """Causal multi-head self-attention, ``[B, S, D] -> [B, S, D]`` (replicated weights: data parallel)."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype):
        self.heads, self.dtype = heads, dtype
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(dim, dim, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        B, S, D = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, S, 3 * self.heads, D // self.heads), 3, axis=2)
        return self.out(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, S, D))


class Block(nnx.Module):
    def __init__(self, args, mesh, *, rngs: nnx.Rngs, dtype):
        D = args.hidden
        self.norm1 = nnx.RMSNorm(D, dtype=dtype, rngs=rngs)
        self.attn = Attention(D, args.heads, rngs=rngs, dtype=dtype)
        self.norm2 = nnx.RMSNorm(D, dtype=dtype, rngs=rngs)
        router = dict(router="deepseek_v3", n_group=args.n_group, topk_group=args.topk_group) \
            if args.router == "deepseek_v3" else dict(router="softmax", norm_topk_prob=True)
        self.moe = MoE(D, args.ffn or 2 * D, args.experts, args.topk, mesh=mesh, rngs=rngs,
                       num_shared_experts=args.shared_experts, capacity_factor=args.capacity_factor or None,
                       dtype=dtype, **router)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        y, aux = self.moe(self.norm2(x))
        return x + y, aux


class MoELM(nnx.Module):
    """Decoder-only LM: ``tokens [B, S] int32 -> (logits [B, S, V] f32, aux)``; aux merges the layers'
    MoE statistics (mean aux_loss, summed overflow, expert_load ``[layers, E]``)."""

    def __init__(self, args, vocab: int, mesh, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(args.dtype)
        self.embed = nnx.Embed(vocab, args.hidden, rngs=rngs)
        self.pos = nnx.Embed(args.seq, args.hidden, rngs=rngs)
        self.blocks = nnx.List([Block(args, mesh, rngs=rngs, dtype=dtype) for _ in range(args.layers)])
        self.norm = nnx.RMSNorm(args.hidden, rngs=rngs)
        self.dtype = dtype

    def __call__(self, tokens):
        x = (self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))[None]).astype(self.dtype)
        auxes = []
        for block in self.blocks:
            x, aux = block(x)
            auxes.append(aux)
        logits = self.embed.attend(self.norm(x).astype(jnp.float32))   # tied head
        return logits, dict(aux_loss=jnp.mean(jnp.stack([a["aux_loss"] for a in auxes])),
                            overflow=sum(a["overflow"] for a in auxes),
                            expert_load=jnp.stack([a["expert_load"] for a in auxes]))


def shard_model(model: nnx.Module, mesh: Mesh):
    """Place every variable by its partitioning metadata: MoE experts over ``ep``, the rest replicated."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, mesh)))


# -- steps ----------------------------------------------------------------------------------------------

def make_train_step(aux_coef: float, bias_rate: float):
    @nnx.jit
    def train_step(model, optimizer, batch):
        def loss_fn(model):
            logits, aux = model(batch[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
            return ce + aux_coef * aux["aux_loss"], (ce, aux)

        (_, (ce, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        # DeepSeek-V3 aux-loss-free balancing: nudge the (non-trainable) selection bias towards equal load.
        for i, block in enumerate(model.blocks):
            if block.moe.score_bias is not None and bias_rate:
                block.moe.score_bias[...] = update_bias(block.moe.score_bias[...], aux["expert_load"][i], bias_rate)
        return ce, aux
    return train_step


def comm_probe(moe: MoE, tokens_per_rank: int, layers: int, seed: int = 0):
    """A jitted function doing exactly the model's dispatch/combine traffic and nothing else.

    Method: per rank, ``layers`` chained expert-major dispatch -> combine (identity experts) on the
    training shapes (T tokens per rank, hidden, K, E, the layer's capacity), under ``jax.grad`` so the
    backward collectives (combine of the cotangents, cached dispatch) run too. Routing is uniform random
    top-k (what a well-balanced router produces). Its run time divided by a training step's is the share
    of step time spent in dispatch/combine (routing math, expert FFNs and attention excluded). On the
    reference backend the "kernels" are XLA all_to_all + gathers; on GPUs the CUDA kernels.
    """
    c = moe.config
    buffer = moe.buffer(tokens_per_rank)
    tok = P(c.token_axes)

    def body(x, w, idx):
        def loss(x, w):
            y = x
            for _ in range(layers):
                d = jax_ep.dispatch(buffer, y, idx, w, expert_alignment=c.expert_alignment, layout="expert_major")
                y = jax_ep.combine(buffer, d.x, d.handle, topk_weights=d.topk_weights)
            return jnp.sum(y.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1))(x, w)

    fn = jax.jit(jax.shard_map(body, mesh=moe.mesh, in_specs=(tok, tok, tok), out_specs=(tok, tok)))
    N = tokens_per_rank * c.num_token_shards
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((N, c.num_experts)), axis=1)[:, :c.topk].astype(np.int32)
    w = rng.random((N, c.topk)).astype(np.float32)
    x = rng.standard_normal((N, c.hidden)).astype(np.float32)
    shard = NamedSharding(moe.mesh, tok)
    args = [jax.device_put(jnp.asarray(a, c.dtype if a is x else None), shard) for a in (x, w, idx)]
    return lambda: fn(*args)


def timed(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` (results blocked on), after one warm-up call that compiles."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- CLI ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jax_ep train", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences), divisible by dp*ep")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=0, help="expert intermediate size (0: 2 * hidden)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--shared-experts", type=int, default=0)
    p.add_argument("--router", choices=["softmax", "deepseek_v3"], default="softmax")
    p.add_argument("--n-group", type=int, default=1)
    p.add_argument("--topk-group", type=int, default=1)
    p.add_argument("--capacity-factor", type=float, default=2.0, help="0: worst-case capacity (never drops)")
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--bias-rate", type=float, default=1e-3, help="deepseek_v3 score-bias update rate")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--dp", type=int, default=0, help="0: auto (devices / ep)")
    p.add_argument("--ep", type=int, default=0, help="0: auto (largest divisor of the device count that "
                   "divides --experts)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-comm-probe", action="store_true", help="skip the dispatch/combine timing")
    return p.parse_args(argv)


def _default_cpu_devices(count: int = 8):
    """Give a CPU-only run ``count`` virtual devices so the EP path is exercised, unless the user chose
    (XLA_FLAGS / jax_num_cpu_devices) or jax already started its backends. Harmless with GPUs (the CPU
    devices are not the default backend then)."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        from jax._src import xla_bridge  # backends_are_initialized has no public spelling
        if xla_bridge.backends_are_initialized() or jax.config.jax_num_cpu_devices > 0:
            return
        jax.config.update("jax_num_cpu_devices", count)
    except Exception:  # noqa: BLE001 - older/newer jax without these hooks: keep the default devices
        pass


def make_mesh(args) -> Mesh:
    devices = jax.devices()
    n = len(devices)
    ep = args.ep or max(d for d in range(1, n + 1) if n % d == 0 and args.experts % d == 0)
    dp = args.dp or n // ep
    if dp * ep > n:
        raise SystemExit(f"dp*ep = {dp * ep} exceeds the {n} devices")
    return Mesh(np.array(devices[: dp * ep]).reshape(dp, ep), ("dp", "ep"))


def main(argv=None) -> dict:
    """Train; returns ``{initial_loss, final_loss, tokens_per_s, comm_share, step_time_s, comm_time_s,
    overflow, losses, config}`` (final_loss: mean cross-entropy of the last min(10, steps) steps)."""
    args = parse_args(argv)
    _default_cpu_devices()
    mesh = make_mesh(args)
    shards = mesh.size
    if args.batch % shards:
        raise SystemExit(f"--batch {args.batch} must be divisible by dp*ep = {shards}")
    data = CharData(make_corpus(seed=args.seed), seed=args.seed)
    model = MoELM(args, len(data.vocab), mesh, rngs=nnx.Rngs(args.seed))
    shard_model(model, mesh)
    warmup = max(1, min(20, args.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1),
                                                  end_value=args.lr * 0.1)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, b2=0.98, weight_decay=0.01), wrt=nnx.Param)
    step = make_train_step(args.aux_coef, args.bias_rate if args.router == "deepseek_v3" else 0.0)
    batch_sharding = NamedSharding(mesh, P(("dp", "ep")))
    backend = jax_ep._backend.resolve("dispatch", None, mesh.devices.flat[0].platform)
    print(f"jax_ep train: {mesh.devices.size} x {mesh.devices.flat[0].platform} devices, mesh dp={mesh.shape['dp']} "
          f"ep={mesh.shape['ep']}, backend {backend}; vocab {len(data.vocab)}, layers {args.layers}, hidden "
          f"{args.hidden}, experts {args.experts} top-{args.topk}, batch {args.batch}x{args.seq}", flush=True)

    losses, times, overflow = [], [], 0
    for i in range(args.steps):
        batch = jax.device_put(jnp.asarray(data.batch(args.batch, args.seq)),
                               batch_sharding)
        t0 = time.perf_counter()
        ce, aux = step(model, optimizer, batch)
        ce = float(ce)  # blocks: the step time below is the full step
        times.append(time.perf_counter() - t0)
        losses.append(ce)
        overflow += int(aux["overflow"])
        if i % args.log_every == 0 or i == args.steps - 1:
            print(f"step {i:5d}  loss {ce:.4f}  aux {float(aux['aux_loss']):.3f}  overflow {int(aux['overflow'])}"
                  f"  {times[-1] * 1e3:.1f} ms", flush=True)

    step_time = statistics.median(times[1:]) if len(times) > 1 else times[0]
    tokens_per_s = args.batch * args.seq / step_time
    comm_time = comm_share = None
    if not args.no_comm_probe:
        comm_time = timed(comm_probe(model.blocks[0].moe, args.batch * args.seq // shards, args.layers))
        comm_share = comm_time / step_time
    tail = losses[-min(10, len(losses)):]
    result = dict(initial_loss=losses[0], final_loss=float(np.mean(tail)), tokens_per_s=tokens_per_s,
                  comm_share=comm_share, step_time_s=step_time, comm_time_s=comm_time, overflow=overflow,
                  losses=losses, config=vars(args))
    print(f"loss {losses[0]:.4f} -> {result['final_loss']:.4f} (mean of last {len(tail)} steps); "
          f"{tokens_per_s:,.0f} tokens/s (median step {step_time * 1e3:.1f} ms); dropped rows {overflow}", flush=True)
    if comm_share is not None:
        print(f"dispatch/combine (fwd+bwd, {args.layers} layers): {comm_time * 1e3:.1f} ms = "
              f"{100 * comm_share:.1f}% of the step", flush=True)
    return result


if __name__ == "__main__":
    main()
