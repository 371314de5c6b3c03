"""Independent numpy oracle of docs/semantics.md (plain loops over ranks and tokens: clarity over speed).

Every function takes the *global* inputs (``[R*T, ...]``: rank s owns rows ``[s*T, (s+1)*T)``) and returns the
per-rank outputs stacked along a leading rank axis (``[R, ...]``), the way ``conftest.run_sharded`` returns
them. Nothing here imports jax_ep except, for the low-latency fp8 path, the fp8 cast itself (tested on its
own in test_fp8.py).

Also: random routing / payload generators shared by the tests.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------

def round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def split_ranks(a, num_ranks):
    """[R*T, ...] -> [R, T, ...]."""
    a = np.asarray(a)
    return a.reshape((num_ranks, a.shape[0] // num_ranks) + a.shape[1:])


def sanitize(ids, num_experts):
    """Ids outside [0, E) -> -1 (docs: an id outside [-1, E) is treated as -1)."""
    ids = np.asarray(ids)
    return np.where((ids >= 0) & (ids < num_experts), ids, -1)


def count_invalid(ids, num_experts):
    ids = np.asarray(ids)
    return int(np.sum((ids < -1) | (ids >= num_experts)))


def _payload(x):
    """x or (x_fp8, scales) -> (data, scales or None)."""
    if isinstance(x, (tuple, list)):
        return np.asarray(x[0]), np.asarray(x[1])
    return np.asarray(x), None


# ---------------------------------------------------------------------------------------------------------
# get_dispatch_layout
# ---------------------------------------------------------------------------------------------------------

def layout_one(topk_idx, num_ranks, num_experts):
    """One rank's layout: (num_tokens_per_rank [R], num_tokens_per_expert [E], is_token_in_rank [T, R])."""
    topk_idx = np.asarray(topk_idx)
    T, K = topk_idx.shape
    e_loc = num_experts // num_ranks
    in_rank = np.zeros((T, num_ranks), bool)
    per_expert = np.zeros(num_experts, np.int32)
    for t in range(T):
        for k in range(K):
            e = int(topk_idx[t, k])
            if 0 <= e < num_experts:
                in_rank[t, e // e_loc] = True
                per_expert[e] += 1
    per_rank = np.zeros(num_ranks, np.int32)
    for r in range(num_ranks):
        for t in range(T):
            per_rank[r] += int(in_rank[t, r])
    return per_rank, per_expert, in_rank


def layout(topk_idx_global, num_ranks, num_experts, num_groups=1):
    """Stacked per-rank layouts. ``num_groups`` splits the global input into independent EP groups first."""
    idx = split_ranks(topk_idx_global, num_groups * num_ranks)
    outs = [layout_one(idx[i], num_ranks, num_experts) for i in range(idx.shape[0])]
    return tuple(np.stack(o) for o in zip(*outs))


# ---------------------------------------------------------------------------------------------------------
# normal dispatch
# ---------------------------------------------------------------------------------------------------------

def _recv_list(idx, r, num_ranks, num_experts):
    """Tokens rank r receives, in order: [(s, t)] for s ascending then t ascending."""
    e_loc = num_experts // num_ranks
    R, T, K = idx.shape
    out = []
    for s in range(R):
        for t in range(T):
            if any(0 <= idx[s, t, k] < num_experts and idx[s, t, k] // e_loc == r for k in range(K)):
                out.append((s, t))
    return out


def _split_inputs(x, topk_idx, topk_weights, R):
    """Per-rank views [R, T, ...] of the global payload (and fp8 scales), ids and weights."""
    data, scales = _payload(x)
    scales = split_ranks(scales, R) if scales is not None else None
    return split_ranks(data, R), scales, split_ranks(topk_idx, R), split_ranks(topk_weights, R)


def dispatch_rank_major(x, topk_idx, topk_weights, num_ranks, num_experts, capacity, expert_alignment=1):
    """Rank-major dispatch of the global inputs; returns a dict of stacked per-rank fields (+ 'slots')."""
    R, E = num_ranks, num_experts
    e_loc = E // R
    data, scales, idx, w = _split_inputs(x, topk_idx, topk_weights, R)
    T, K = idx.shape[1:]
    H = data.shape[2]
    C = capacity
    res = {k: [] for k in ("x", "x_scales", "topk_idx", "topk_weights", "num_recv", "tokens_per_expert",
                           "overflow", "num_invalid_ids")}
    slots = np.full((R, T, R), -1, np.int64)   # slots[s, t, r]: slot of source (s, t) at rank r, -1 if none
    for r in range(R):
        recv = _recv_list(idx, r, R, E)
        rx = np.zeros((C, H), data.dtype)
        rs = np.zeros((C, scales.shape[2]), np.float32) if scales is not None else None
        ri = np.full((C, K), -1, np.int32)
        rw = np.zeros((C, K), np.float32)
        tpe = np.zeros(e_loc, np.int32)
        for j, (s, t) in enumerate(recv):
            if j >= C:
                break
            slots[s, t, r] = j
            rx[j] = data[s, t]
            if rs is not None:
                rs[j] = scales[s, t]
            for k in range(K):
                e = int(idx[s, t, k])
                if 0 <= e < E and e // e_loc == r:
                    ri[j, k] = e - r * e_loc
                    rw[j, k] = w[s, t, k]
                    tpe[e - r * e_loc] += 1
        n = min(len(recv), C)
        res["x"].append(rx)
        res["x_scales"].append(rs)
        res["topk_idx"].append(ri)
        res["topk_weights"].append(rw)
        res["num_recv"].append(np.int32(n))
        res["overflow"].append(np.int32(len(recv) - n))
        res["tokens_per_expert"].append(np.array([round_up(int(c), expert_alignment) for c in tpe], np.int32))
        res["num_invalid_ids"].append(np.int32(count_invalid(idx[r], E)))
    out = {k: (None if v[0] is None else np.stack(v)) for k, v in res.items()}
    out["group_sizes"] = None
    out["slots"] = slots
    return out


def expert_major_capacity(capacity, num_topk, num_local_experts, expert_alignment, max_recv_rows=None):
    return max_recv_rows if max_recv_rows else capacity * num_topk + num_local_experts * (expert_alignment - 1)


def dispatch_expert_major(x, topk_idx, topk_weights, num_ranks, num_experts, capacity_rows, expert_alignment=1,
                          token_capacity=None):
    """Expert-major dispatch: the rank-major result (token capacity C = ``token_capacity``, default R*T) expanded
    into one row per (slot, k) whose expert is local, grouped by expert, padded; ``capacity_rows`` = Cx.

    Returns stacked per-rank fields plus 'rows': rows[r] = list of (position, s, t, k) of the kept rows of
    rank r, and 'slots' (as dispatch_rank_major's: which tokens survived the token-capacity stage)."""
    R, E, A, Cx = num_ranks, num_experts, expert_alignment, capacity_rows
    e_loc = E // R
    data, scales, idx, w = _split_inputs(x, topk_idx, topk_weights, R)
    T, K = idx.shape[1:]
    H = data.shape[2]
    C = R * T if token_capacity is None else token_capacity
    res = {k: [] for k in ("x", "x_scales", "topk_idx", "topk_weights", "num_recv", "tokens_per_expert",
                           "overflow", "num_invalid_ids", "group_sizes")}
    all_rows = []
    slots = np.full((R, T, R), -1, np.int64)
    for r in range(R):
        recv = _recv_list(idx, r, R, E)
        token_drops = max(0, len(recv) - C)
        groups = [[] for _ in range(e_loc)]
        for j, (s, t) in enumerate(recv[:C]):           # slot order = (source rank, token)
            slots[s, t, r] = j
            for k in range(K):
                e = int(idx[s, t, k])
                if 0 <= e < E and e // e_loc == r:
                    groups[e - r * e_loc].append((s, t, k))
        rx = np.zeros((Cx, H), data.dtype)
        rs = np.zeros((Cx, scales.shape[2]), np.float32) if scales is not None else None
        ri = np.full((Cx,), -1, np.int32)
        rw = np.zeros((Cx,), np.float32)
        gs = np.zeros(e_loc, np.int32)
        start, kept, total, rows = 0, 0, 0, []
        for e in range(e_loc):
            padded = round_up(len(groups[e]), A)
            gs[e] = max(0, min(padded, Cx - start))
            for i, (s, t, k) in enumerate(groups[e]):
                total += 1
                pos = start + i
                if pos >= Cx:
                    continue
                kept += 1
                rows.append((pos, s, t, k))
                rx[pos] = data[s, t]
                if rs is not None:
                    rs[pos] = scales[s, t]
                ri[pos] = e
                rw[pos] = w[s, t, k]
            start += padded
        all_rows.append(rows)
        res["x"].append(rx)
        res["x_scales"].append(rs)
        res["topk_idx"].append(ri)
        res["topk_weights"].append(rw)
        res["num_recv"].append(np.int32(kept))
        res["overflow"].append(np.int32(token_drops + total - kept))
        res["tokens_per_expert"].append(gs.copy())
        res["group_sizes"].append(gs)
        res["num_invalid_ids"].append(np.int32(count_invalid(idx[r], E)))
    out = {k: (None if v[0] is None else np.stack(v)) for k, v in res.items()}
    out["rows"] = all_rows
    out["slots"] = slots
    return out


# ---------------------------------------------------------------------------------------------------------
# normal combine
# ---------------------------------------------------------------------------------------------------------

def _biases(bias, R):
    if bias is None:
        return []
    bias = bias if isinstance(bias, (tuple, list)) else (bias,)
    return [split_ranks(np.asarray(b, np.float32), R) for b in bias]


def combine_rank_major(y, slots, out_dtype, bias=None, topk_weights=None):
    """y [R, C, H] per-rank rows; slots [R_src, T, R] from dispatch_rank_major.

    Returns (out [R, T, H] in out_dtype, f32 value before the cast, f32 sum of |terms| (error scale)) and,
    with topk_weights [R, C, K], also the combined weights [R, T, K]."""
    y = np.asarray(y)
    R, T, _ = slots.shape
    H = y.shape[2]
    out = np.zeros((R, T, H), np.float32)
    mag = np.zeros((R, T, H), np.float32)
    cw = None if topk_weights is None else np.zeros((R, T, np.asarray(topk_weights).shape[2]), np.float32)
    for s in range(R):
        for t in range(T):
            for r in range(R):            # ascending rank order
                j = slots[s, t, r]
                if j < 0:
                    continue
                row = y[r, j].astype(np.float32)
                out[s, t] = out[s, t] + row
                mag[s, t] += np.abs(row)
                if cw is not None:
                    cw[s, t] = cw[s, t] + np.asarray(topk_weights)[r, j]
    for b in _biases(bias, R):
        out = out + b
        mag = mag + np.abs(b)
    res = (out.astype(out_dtype), out, mag)
    return res + (cw,) if cw is not None else res


def combine_expert_major(y, rows, num_ranks, num_tokens, out_dtype, row_weights, bias=None):
    """y [R, Cx, H]; rows from dispatch_expert_major; row_weights [R, Cx] (the handle's or given).

    Each rank r first sums the rows of token t it holds, w_row * y_row in ascending k (f32); then the
    per-rank partials are summed over ranks in ascending order (f32). Returns (out, f32 value, |terms|)."""
    y = np.asarray(y)
    R, T = num_ranks, num_tokens
    H = y.shape[2]
    w = np.asarray(row_weights, np.float32)
    terms = {}   # (s, t) -> {r: [(k, pos)]}
    for r in range(R):
        for pos, s, t, k in rows[r]:
            terms.setdefault((s, t), {}).setdefault(r, []).append((k, pos))
    out = np.zeros((R, T, H), np.float32)
    mag = np.zeros((R, T, H), np.float32)
    for (s, t), per_rank in terms.items():
        for r in sorted(per_rank):
            partial = np.zeros(H, np.float32)
            for k, pos in sorted(per_rank[r]):
                term = (w[r, pos] * y[r, pos].astype(np.float32)).astype(np.float32)
                partial = partial + term
                mag[s, t] += np.abs(term)
            out[s, t] = out[s, t] + partial
    for b in _biases(bias, R):
        out = out + b
        mag = mag + np.abs(b)
    return out.astype(out_dtype), out, mag


# ---------------------------------------------------------------------------------------------------------
# low-latency
# ---------------------------------------------------------------------------------------------------------

def low_latency_dispatch(x, topk_idx, num_ranks, num_experts, max_tokens_per_rank, x_fp8=None, scales=None):
    """x [R*T, H] (any dtype, copied as is) or the pre-cast (x_fp8, scales) of every source token.

    Returns dict: x [R, E_loc, S, H], x_scales [R, E_loc, S, G] (or None), count [R, E_loc],
    src_info [R, E_loc, S], layout_range [R, E_loc, R], row_of: dict (r, e_loc, s, t) -> row."""
    R, E = num_ranks, num_experts
    e_loc = E // R
    S = R * max_tokens_per_rank
    data = np.asarray(x) if x_fp8 is None else np.asarray(x_fp8)
    data = split_ranks(data, R)
    sc = split_ranks(scales, R) if scales is not None else None
    idx = split_ranks(topk_idx, R)
    T, K = idx.shape[1:]
    H = data.shape[2]
    ox = np.zeros((R, e_loc, S, H), data.dtype)
    osc = np.zeros((R, e_loc, S, sc.shape[2]), sc.dtype) if sc is not None else None
    count = np.zeros((R, e_loc), np.int32)
    src_info = np.full((R, e_loc, S), -1, np.int32)
    layout_range = np.zeros((R, e_loc, R), np.int32)
    row_of = {}
    for r in range(R):
        for el in range(e_loc):
            g = r * e_loc + el
            j = 0
            for s in range(R):
                for t in range(T):
                    if any(int(idx[s, t, k]) == g for k in range(K)):   # one row per (t, e)
                        ox[r, el, j] = data[s, t]
                        if osc is not None:
                            osc[r, el, j] = sc[s, t]
                        src_info[r, el, j] = t
                        layout_range[r, el, s] += 1
                        row_of[(r, el, s, t)] = j
                        j += 1
            count[r, el] = j
    return dict(x=ox, x_scales=osc, count=count, src_info=src_info, layout_range=layout_range, row_of=row_of)


def low_latency_combine(y, topk_idx, topk_weights, row_of, num_ranks, num_experts):
    """y [R, E_loc, S, H] per-rank expert outputs. out[t] = sum_k (ascending, valid) w * y_owner[row] in f32.

    Returns (out bf16 [R, T, H], f32 value, f32 |terms|)."""
    R, E = num_ranks, num_experts
    e_loc = E // R
    y = np.asarray(y)
    idx, w = split_ranks(topk_idx, R), split_ranks(topk_weights, R)
    T, K = idx.shape[1:]
    H = y.shape[3]
    out = np.zeros((R, T, H), np.float32)
    mag = np.zeros((R, T, H), np.float32)
    for s in range(R):
        for t in range(T):
            for k in range(K):
                e = int(idx[s, t, k])
                if not 0 <= e < E:
                    continue
                owner, el = e // e_loc, e % e_loc
                term = (np.float32(w[s, t, k]) * y[owner, el, row_of[(owner, el, s, t)]].astype(np.float32))
                out[s, t] = out[s, t] + term.astype(np.float32)
                mag[s, t] += np.abs(term)
    return out.astype(BF16), out, mag


# ---------------------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------------------

def assert_bits_equal(got, want, what=""):
    """Same shape, same dtype and identical bits (distinguishes -0/+0; NaN-safe)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    gb = got.view(f"u{got.dtype.itemsize}") if got.dtype.itemsize in (1, 2, 4, 8) else got
    wb = want.view(f"u{want.dtype.itemsize}") if want.dtype.itemsize in (1, 2, 4, 8) else want
    if got.dtype == np.bool_:
        gb, wb = got, want
    np.testing.assert_array_equal(gb, wb, err_msg=what)


def assert_close_f32(got, want, mag, what="", rel=1e-6):
    """|got - want| <= rel * (sum of |terms|) + tiny: the bound of any f32 summation order."""
    got, want, mag = (np.asarray(a, np.float32) for a in (got, want, mag))
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    bound = rel * mag + 1e-30
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, worst |diff|={float(err.max())} "
                           f"e.g. got {got[bad][:4]} want {want[bad][:4]}")


def bf16_ulp_diff(a, b):
    """Distance in bf16 representable steps between two bf16 arrays."""
    def ordered(v):
        bits = np.asarray(v, BF16).view(np.uint16).astype(np.int64)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)
    return np.abs(ordered(a) - ordered(b))


def assert_bf16_close(got, want_f32, what="", ulps=1):
    """got (bf16) within ``ulps`` bf16 steps of the f32 reference rounded to bf16."""
    got = np.asarray(got)
    assert got.dtype == BF16, f"{what}: dtype {got.dtype}"
    d = bf16_ulp_diff(got, np.asarray(want_f32, np.float32).astype(BF16))
    assert d.max(initial=0) <= ulps, f"{what}: up to {int(d.max())} bf16 ulps off"


# ---------------------------------------------------------------------------------------------------------
# random inputs
# ---------------------------------------------------------------------------------------------------------

def make_routing(rng, num_ranks, num_tokens, num_experts, num_topk, *, neg_frac=0.2, duplicates=False,
                 invalid=False, uneven=True, skew=None):
    """Random routing [R*T, K] int32 and weights [R*T, K] float32.

    * ``neg_frac`` of the entries are -1;
    * ``uneven``: rank s has a different number n_s of live tokens, its tail rows are all -1 (n_s spans
      0..T across ranks when R allows);
    * ``duplicates``: ids drawn with replacement (repeats in a row), else distinct per row (when K <= E);
    * ``invalid``: some entries set to out-of-range ids (E, E+3, -7, -2**31);
    * ``skew``: probability of sending an entry to experts of rank 0 (load imbalance, for overflow tests).
    Weights are random everywhere (also where the id is -1, so their zeroing is observable).
    """
    R, T, E, K = num_ranks, num_tokens, num_experts, num_topk
    idx = np.empty((R * T, K), np.int32)
    for i in range(R * T):
        if duplicates or K > E:
            idx[i] = rng.integers(0, E, size=K)
        else:
            idx[i] = rng.choice(E, size=K, replace=False)
    if skew is not None:
        e_loc = E // R
        hot = rng.random((R * T, K)) < skew
        idx = np.where(hot, rng.integers(0, e_loc, size=(R * T, K)), idx).astype(np.int32)
    idx[rng.random((R * T, K)) < neg_frac] = -1
    if uneven:
        live = rng.permutation(np.linspace(0, T, R).round().astype(int)) if R > 1 else [rng.integers(T // 2, T + 1)]
        for s in range(R):
            idx[s * T + int(live[s]):(s + 1) * T] = -1
    if invalid:
        bad = rng.random((R * T, K)) < 0.1
        choices = np.array([E, E + 3, -7, -2 ** 31], np.int64)
        idx = np.where(bad, choices[rng.integers(0, 4, size=(R * T, K))], idx).astype(np.int32)
        idx[0, 0] = E + 3   # at least one, on rank 0
    weights = rng.uniform(0.05, 1.0, size=(R * T, K)).astype(np.float32)
    return idx, weights


def make_x(rng, rows, hidden, dtype=np.float32):
    """Random normal payload (never constant)."""
    return rng.standard_normal((rows, hidden)).astype(np.float32).astype(dtype)
