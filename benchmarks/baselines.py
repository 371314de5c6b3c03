"""The work of jax_ep's normal-mode dispatch / combine done with plain JAX collectives (benchmark baselines).

Both baselines are what a user would write without jax_ep (per-rank code, inside ``jax.shard_map`` over the
EP axis). They deliver what jax_ep's rank-major dispatch delivers: every token once to every rank that owns
one of its experts, with its routing (local expert ids, -1 for other ranks' experts, and masked weights),
and combine sums each token's rows back at its source in f32 (ascending source rank).

- ``PaddedAllToAll``: every rank sends a fixed ``[R, cap, H]`` buffer with ``jax.lax.all_to_all`` (block r
  = the tokens for rank r, compacted, zero padded); ``cap`` defaults to T (nothing is ever dropped).
- ``RaggedAllToAll``: sort the (token, destination rank) pairs by destination, compute offsets and sizes
  (one ``all_gather`` of the per-destination counts), ``jax.lax.ragged_all_to_all`` into a ``[R*T, H]``
  receive buffer (rows land in (source rank, token) order: jax_ep's rank-major layout), and for combine the
  reverse ``ragged_all_to_all`` followed by the unpermute (a scatter-add into ``[T, H]``).

- ``LowLatencyPaddedAllToAll``: the decode-mode work (jax_ep's ``low_latency_dispatch`` / ``_combine``) with
  one ``all_to_all``: every rank sends ``[E, T, row]`` (each expert's tokens from this rank in token order,
  padded to T), which arrives as the expert-major ``[E_loc, R*T, H]`` buffers, padded per source rank
  instead of compacted; combine sends the answers back the same way and sums ``w * y`` in f32 at the source.

``ragged_all_to_all_support(mesh)`` says whether the backend runs ``ragged_all_to_all`` (XLA:CPU does not in
jax 0.10); ``emulated_ragged_all_to_all`` has its semantics on ``all_to_all`` (tests use it to check the
permutation code on CPU; it is not a performance baseline).

Payloads: ``x`` is ``[T, H]`` bf16/f32 or ``(x_fp8 [T, H] float8_e4m3fn, scales [T, H/128] f32)``; fp8
travels as bytes (not every backend's collectives know fp8 types).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BASELINES = ("all_to_all_padded", "ragged_all_to_all")


# -- helpers ------------------------------------------------------------------------------------------------

def _to_wire(a):
    return jax.lax.bitcast_convert_type(a, jnp.uint8) if a.dtype == jnp.float8_e4m3fn else a


def _from_wire(a, dtype):
    return jax.lax.bitcast_convert_type(a, dtype) if jnp.dtype(dtype) == jnp.float8_e4m3fn else a


def _excl_cumsum(a, axis=0):
    return jnp.cumsum(a, axis=axis, dtype=jnp.int32) - a


def _take(table, index):
    """table[index] along axis 0; out-of-range indices (the sentinel len(table)) give zero rows."""
    return jnp.take(table, index, axis=0, mode="fill", fill_value=0)


def _split_payload(x):
    if isinstance(x, (tuple, list)):
        data, scales = x
        return data, scales
    return x, None


def routing(topk_idx, num_ranks: int, num_experts: int):
    """Per-rank routing: (ids with invalid entries -1, in_rank [T, R] bool, pos [T, R] int32, counts [R]).

    ``pos[t, r]`` is token t's position among the tokens this rank sends to rank r (token order)."""
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    ids = jnp.where(valid, topk_idx, -1)
    owner = jnp.where(valid, ids // (num_experts // num_ranks), -1)
    in_rank = jnp.any(owner[:, :, None] == jnp.arange(num_ranks, dtype=owner.dtype), axis=1)
    pos = jnp.cumsum(in_rank, axis=0, dtype=jnp.int32) - 1
    counts = jnp.sum(in_rank, axis=0, dtype=jnp.int32)
    return ids, in_rank, pos, counts


def _local_routing(ids, weights, row_valid, me, num_local_experts: int):
    """Received global ids -> local ids (-1 for other ranks' experts and padding), weights masked alike."""
    local = ids - me * num_local_experts
    mine = row_valid[:, None] & (ids >= 0) & (local >= 0) & (local < num_local_experts)
    local = jnp.where(mine, local, -1)
    return local, jnp.where(mine, weights, 0.0)


def _pack_meta(ids, weights):
    return jnp.concatenate([ids, jax.lax.bitcast_convert_type(weights, jnp.int32)], axis=1)


def _unpack_meta(meta, k):
    return meta[:, :k], jax.lax.bitcast_convert_type(meta[:, k:], jnp.float32)


# -- padded all_to_all --------------------------------------------------------------------------------------

class PaddedAllToAll:
    """``jax.lax.all_to_all`` of a fixed ``[R, cap, ...]`` send buffer per rank (capacity-padded)."""

    name = "all_to_all_padded"

    def __init__(self, axis: str, num_ranks: int, num_experts: int, capacity: int | None = None):
        self.axis, self.R, self.E, self.capacity = axis, num_ranks, num_experts, capacity

    def _cap(self, num_tokens):
        return self.capacity or num_tokens

    def wire_rows(self, num_tokens: int) -> int:
        """Rows every rank sends (padding included)."""
        return self.R * self._cap(num_tokens)

    def dispatch(self, x, topk_idx, topk_weights):
        data, scales = _split_payload(x)
        T, K = topk_idx.shape
        R, cap, axis = self.R, self._cap(T), self.axis
        ids, in_rank, pos, counts = routing(topk_idx, R, self.E)
        kept = in_rank & (pos < cap)
        slot = jnp.where(kept, jnp.arange(R, dtype=jnp.int32)[None, :] * cap + pos, R * cap)   # [T, R]
        tokens = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, R))
        src = jnp.full((R * cap,), T, jnp.int32).at[slot.reshape(-1)].set(tokens.reshape(-1), mode="drop")

        def exchange(a):
            return jax.lax.all_to_all(_take(a, src), axis, 0, 0, tiled=True)   # block s: from rank s

        recv_counts = jax.lax.all_to_all(jnp.minimum(counts, cap), axis, 0, 0, tiled=True)
        recv_x = _from_wire(exchange(_to_wire(data)), data.dtype)
        recv_scales = exchange(scales) if scales is not None else None
        recv_ids, recv_w = _unpack_meta(exchange(_pack_meta(ids, topk_weights)), K)
        row_valid = (jnp.arange(cap)[None, :] < recv_counts[:, None]).reshape(-1)
        me = jax.lax.axis_index(axis)
        local, w = _local_routing(recv_ids, recv_w, row_valid, me, self.E // R)
        return dict(x=recv_x, x_scales=recv_scales, topk_idx=local, topk_weights=w, row_valid=row_valid,
                    num_recv=jnp.sum(recv_counts), dropped=jnp.sum(counts - jnp.minimum(counts, cap)),
                    state=dict(slot=slot))

    def combine(self, y, state):
        """y [R*cap, H]: the answer for each received row -> [T, H] sums at the sources (f32, ascending rank).
        ``state``: the dispatch output's ``state``."""
        slot = state["slot"]
        back = jax.lax.all_to_all(y, self.axis, 0, 0, tiled=True)         # block r: rank r's answers
        acc = jnp.zeros((slot.shape[0],) + y.shape[1:], jnp.float32)
        for r in range(self.R):
            acc = acc + _take(back, slot[:, r]).astype(jnp.float32)
        return acc.astype(y.dtype)


# -- low-latency (decode) work on a padded all_to_all --------------------------------------------------------

class LowLatencyPaddedAllToAll:
    """Decode-mode dispatch / combine with ``jax.lax.all_to_all`` and per-(expert, source) padding to T."""

    name = "all_to_all_padded"

    def __init__(self, axis: str, num_ranks: int, num_experts: int):
        self.axis, self.R, self.E = axis, num_ranks, num_experts

    def wire_rows(self, num_tokens: int) -> int:
        return self.E * num_tokens

    def dispatch(self, x, topk_idx, use_fp8: bool):
        """x [T, H] bf16 -> dict(x [E_loc, R*T, H] (fp8 or bf16), x_scales, count [E_loc], layout_range
        [E_loc, R], state). Rows of expert e from source s sit at [s*T, s*T + layout_range[e, s])."""
        T, _ = topk_idx.shape
        R, E, axis = self.R, self.E, self.axis
        E_loc = E // R
        valid = (topk_idx >= 0) & (topk_idx < E)
        ids = jnp.where(valid, topk_idx, -1)
        member = jnp.any(ids[:, :, None] == jnp.arange(E, dtype=ids.dtype), axis=1)     # [T, E]: one row per (t, e)
        pos = jnp.cumsum(member, axis=0, dtype=jnp.int32) - 1                          # token order per expert
        slot = jnp.where(member, jnp.arange(E, dtype=jnp.int32)[None, :] * T + pos, E * T)
        tokens = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, E))
        src = jnp.full((E * T,), T, jnp.int32).at[slot.reshape(-1)].set(tokens.reshape(-1), mode="drop")
        if use_fp8:
            import jax_ep
            data, scales = jax_ep.per_token_cast_to_fp8(x)
        else:
            data, scales = x.astype(jnp.bfloat16), None

        def exchange(a):   # [T, ...] rows -> [E_loc, R*T, ...]: chunk r of the send buffer = rank r's experts
            recv = jax.lax.all_to_all(_take(a, src), axis, 0, 0, tiled=True)           # [R_src * E_loc * T, ...]
            recv = recv.reshape((R, E_loc, T) + a.shape[1:])
            return jnp.swapaxes(recv, 0, 1).reshape((E_loc, R * T) + a.shape[1:])

        recv_x = _from_wire(exchange(_to_wire(data)), data.dtype)
        recv_scales = exchange(scales) if scales is not None else None
        counts = jnp.sum(member, axis=0, dtype=jnp.int32)                              # [E] from this rank
        layout_range = jax.lax.all_to_all(counts, axis, 0, 0, tiled=True).reshape(R, E_loc).T
        return dict(x=recv_x, x_scales=recv_scales, count=jnp.sum(layout_range, axis=1), layout_range=layout_range,
                    state=dict(pos=pos))

    def combine(self, y, state, topk_idx, topk_weights):
        """y [E_loc, R*T, H] bf16 (the answers, in the dispatch's padded layout) -> [T, H] bf16,
        sum over valid k in ascending order of w[t, k] * y in f32."""
        pos = state["pos"]
        T, K = topk_idx.shape
        R, E = self.R, self.E
        E_loc = E // R
        send = jnp.swapaxes(y.reshape((E_loc, R, T) + y.shape[2:]), 0, 1).reshape((R * E_loc * T,) + y.shape[2:])
        back = jax.lax.all_to_all(send, self.axis, 0, 0, tiled=True)                  # [E * T, H]: expert-major
        valid = (topk_idx >= 0) & (topk_idx < E)
        ids = jnp.where(valid, topk_idx, 0)
        out = jnp.zeros((T,) + y.shape[2:], jnp.float32)
        for k in range(K):
            row = jnp.where(valid[:, k], ids[:, k] * T + jnp.take_along_axis(pos, ids[:, k:k + 1], axis=1)[:, 0],
                            E * T)
            wk = jnp.where(valid[:, k], topk_weights[:, k], 0.0)
            out = out + _take(back, row).astype(jnp.float32) * wk[:, None]
        return out.astype(jnp.bfloat16)


# -- ragged_all_to_all + permutation ------------------------------------------------------------------------

class RaggedAllToAll:
    """Sort by destination, ``ragged_all_to_all``, and the reverse plus unpermute for combine."""

    name = "ragged_all_to_all"

    def __init__(self, axis: str, num_ranks: int, num_experts: int, ragged_fn=None):
        self.axis, self.R, self.E = axis, num_ranks, num_experts
        self.ragged_fn = ragged_fn or jax.lax.ragged_all_to_all

    def wire_rows(self, num_tokens: int) -> int:
        return 0  # only the routed rows move

    def _ragged(self, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
        i32 = jnp.int32
        return self.ragged_fn(operand, output, input_offsets.astype(i32), send_sizes.astype(i32),
                              output_offsets.astype(i32), recv_sizes.astype(i32), axis_name=self.axis)

    def dispatch(self, x, topk_idx, topk_weights):
        data, scales = _split_payload(x)
        T, K = topk_idx.shape
        R, axis = self.R, self.axis
        S = T * min(K, R)                        # rows this rank can send at most
        ids, in_rank, _, counts = routing(topk_idx, R, self.E)
        # 1. permutation: (token, destination) pairs sorted by destination, token order within one.
        key = jnp.where(in_rank, jnp.arange(R, dtype=jnp.int32)[None, :], R).reshape(-1)
        order = jnp.argsort(key, stable=True)[:S].astype(jnp.int32)
        tok = jnp.where(jnp.arange(S) < jnp.sum(counts), order // R, T)   # T: nothing to send
        # 2. offsets and sizes: rows from lower source ranks come first at every receiver.
        all_counts = jax.lax.all_gather(counts, axis)                      # [R_src, R_dst]
        me = jax.lax.axis_index(axis)
        input_offsets = _excl_cumsum(counts)
        output_offsets = _excl_cumsum(all_counts, axis=0)[me]
        recv_sizes = all_counts[:, me]

        # 3. the exchange into a [R*T, ...] receive buffer (the worst case: T rows from every rank).
        def exchange(a):
            send = _take(a, tok)
            out = jnp.zeros((R * T,) + a.shape[1:], a.dtype)
            return self._ragged(send, out, input_offsets, counts, output_offsets, recv_sizes)

        recv_x = _from_wire(exchange(_to_wire(data)), data.dtype)
        recv_scales = exchange(scales) if scales is not None else None
        recv_ids, recv_w = _unpack_meta(exchange(_pack_meta(ids, topk_weights)), K)
        num_recv = jnp.sum(recv_sizes)
        row_valid = jnp.arange(R * T) < num_recv
        local, w = _local_routing(recv_ids, recv_w, row_valid, me, self.E // R)
        return dict(x=recv_x, x_scales=recv_scales, topk_idx=local, topk_weights=w, row_valid=row_valid,
                    num_recv=num_recv, dropped=jnp.zeros((), jnp.int32),
                    state=dict(tok=tok, all_counts=all_counts))

    def combine(self, y, state):
        """y [R*T, H] (received order) -> reverse ragged_all_to_all -> unpermute (scatter-add) -> [T, H].
        ``state``: the dispatch output's ``state``."""
        tok, all_counts = state["tok"], state["all_counts"]
        S = tok.shape[0]
        T = y.shape[0] // self.R
        me = jax.lax.axis_index(self.axis)
        recv_sizes = all_counts[:, me]
        back = self._ragged(y, jnp.zeros((S,) + y.shape[1:], y.dtype),
                            _excl_cumsum(recv_sizes),                      # my chunk of source s's rows
                            recv_sizes,
                            _excl_cumsum(all_counts, axis=1)[:, me],       # where source s keeps them
                            all_counts[me, :])
        acc = jnp.zeros((T,) + y.shape[1:], jnp.float32).at[tok].add(back.astype(jnp.float32), mode="drop")
        return acc.astype(y.dtype)


# -- ragged_all_to_all availability and a CPU stand-in ------------------------------------------------------

def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """``jax.lax.ragged_all_to_all`` semantics (one slice per peer) on ``all_to_all`` of padded chunks.

    For testing the code around ragged_all_to_all where the backend lacks it (it moves R x the operand): the
    offset and size arrays must have one entry per rank of ``axis_name``."""
    M = operand.shape[0]
    i = jnp.arange(M, dtype=jnp.int32)
    rows = jnp.where(i[None, :] < send_sizes[:, None], input_offsets[:, None] + i[None, :], M)      # [R, M]
    chunks = _take(operand, rows.reshape(-1))                                      # peer j's chunk at block j
    recv = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)                  # block s: from rank s
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)       # where each chunk lands
    dest = jnp.where(i[None, :] < recv_sizes[:, None], offsets[:, None] + i[None, :], output.shape[0])
    return output.at[dest.reshape(-1)].set(recv, mode="drop")


@functools.lru_cache(maxsize=None)
def _probe(platform: str, devices: tuple):
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(np.array(devices), ("p",))
    R = len(devices)

    def f(x):
        sizes = jnp.ones((R,), jnp.int32)
        offsets = jnp.arange(R, dtype=jnp.int32)
        return jax.lax.ragged_all_to_all(x, jnp.zeros_like(x), offsets, sizes,
                                         jax.lax.axis_index("p") * jnp.ones((R,), jnp.int32), sizes,
                                         axis_name="p")

    x = jnp.arange(R * R * 2, dtype=jnp.float32).reshape(R * R, 2)
    try:
        out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("p"), out_specs=P("p")))(x)
        got = np.asarray(out).reshape(R, R, 2)
        want = np.asarray(x).reshape(R, R, 2).transpose(1, 0, 2)   # row s of rank r = rank s's row r
        if not np.array_equal(got, want):
            return False, "jax.lax.ragged_all_to_all returned wrong data in the probe"
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any backend failure means: cannot run this baseline
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"jax.lax.ragged_all_to_all unavailable on {platform}: {type(exc).__name__}: {first}"


def ragged_all_to_all_support(mesh) -> tuple[bool, str]:
    """(True, "") if ``jax.lax.ragged_all_to_all`` runs on this mesh's backend, else (False, reason).

    Probed once per platform with the mesh's first min(2, size) addressable devices."""
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    devices = tuple(devices[:2]) if len(devices) >= 2 else tuple(devices[:1])
    return _probe(devices[0].platform, devices)


def make_baseline(name: str, axis: str, num_ranks: int, num_experts: int, *, capacity: int | None = None,
                  ragged_fn=None, mode: str = "normal"):
    if mode == "low_latency":
        if name != "all_to_all_padded":
            raise ValueError(f"the low-latency baseline is all_to_all_padded, got {name!r}")
        return LowLatencyPaddedAllToAll(axis, num_ranks, num_experts)
    if name == "all_to_all_padded":
        return PaddedAllToAll(axis, num_ranks, num_experts, capacity)
    if name == "ragged_all_to_all":
        return RaggedAllToAll(axis, num_ranks, num_experts, ragged_fn)
    raise ValueError(f"unknown baseline {name!r} (one of {BASELINES})")
