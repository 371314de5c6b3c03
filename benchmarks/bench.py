"""jax_ep benchmark sweep: dispatch / combine of jax_ep and of plain-JAX baselines, against measured limits.

Single process (every local device is a rank; the default)::

    python benchmarks/bench.py --tokens 1,64,512,4096,8192 --hidden 7168 --modes normal,low_latency

Several processes (one rank each; several ranks may share a GPU under MPS)::

    python -m jax_ep.launch --nproc 8 -- python benchmarks/bench.py --hbm-bytes-per-s "$B" ...

CPU smoke run (reference backend on 8 virtual devices), results checked against jax_ep::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench.py --tiny --check --plot

For every point (mode, op, dtype, ranks R, tokens per rank T, hidden H, top-k K, experts E, implementation):

- ``op_s``: kernel-side time, a jitted ``fori_loop`` of ``--loop`` ops divided by ``--loop`` (launch and host
  overhead amortised; an optimization barrier keeps XLA from hoisting the op out of the loop);
- ``jit_s``: through-jit time, one op per jitted call (what a step that calls it once pays);
- both the median over ``--repeats`` calls, the maximum over ranks (processes) in the launcher harness;
- ``bytes`` (DeepEP's conventions): normal mode = received tokens summed over ranks x row bytes (bf16 2H;
  fp8 H + 4*H/128, its f32 scales included; combine counts the same rows in bf16); low-latency mode =
  (token, expert) selections summed over ranks x row bytes. ``GBps_* = bytes / time``. Every
  implementation of a point is charged the same bytes (the useful work), whatever it moves on the wire.
- ``ratio_*``: GB/s over the ceiling derived from the copy bandwidth B measured in the same run
  (DESIGN.md section 6: received bytes summed over ranks, dispatch B/4, combine B/3, per physical device).

Implementations: ``jax_ep`` (auto backend: the CUDA kernels where they exist), ``jax_ep_reference`` (the
pure-JAX reference backend; skipped where ``jax_ep`` already runs it), and the baselines of
``baselines.py``: padded ``all_to_all`` (both modes; in low-latency mode every rank sends ``[E, T, row]``,
each expert's tokens padded to T) and ``ragged_all_to_all`` with its permutation (normal mode).
Skipped points are recorded with their reason. Results go to ``benchmarks/results/`` as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import jax  # noqa: E402  (no backend is initialised at import: the launcher harness sets flags first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import baselines  # noqa: E402
import jax_ep  # noqa: E402
from tests.gpu.harness import timed as time_call  # noqa: E402  (median of blocking calls, after a warm-up)

SCHEMA = "jax_ep.bench/1"
MODES = ("normal", "low_latency")
DTYPES = ("bf16", "fp8")
IMPLS = ("jax_ep", "jax_ep_reference") + baselines.BASELINES
AXIS = "ep"
RESULTS_DIR = os.path.join(HERE, "results")
CONVENTIONS = (
    "normal: bytes = received tokens summed over ranks x row bytes (bf16 2H, fp8 H + 4*H/128 with its f32 "
    "scales); combine counts the same rows in bf16. low_latency: bytes = (token, expert) selections summed "
    "over ranks x row bytes (dispatch fp8 H + 4*H/128 or bf16 2H; combine bf16 2H). op_s = time per op "
    "inside a jitted fori_loop of `loop` ops; jit_s = one op per jitted call; medians over `repeats`, max "
    "over ranks. ceiling = physical devices x B/4 (dispatch) or B/3 (combine), B = copy bandwidth (read + "
    "write) measured in the same run (DESIGN.md section 6).")


# ------------------------------------------------------------------------------------------------------------
# configuration

@dataclasses.dataclass
class SweepConfig:
    """What to sweep. Every combination of the tuples is a work point (invalid ones are skipped)."""
    tokens: tuple = (1, 8, 64, 256, 1024, 4096, 8192)
    hidden: tuple = (7168,)
    topk: tuple = (8,)
    experts: tuple = (256,)
    dtypes: tuple = DTYPES
    modes: tuple = MODES
    ranks: tuple | None = None          # None: every device (single process) / the launched processes
    impls: tuple = IMPLS
    loop: int = 10
    repeats: int = 10
    ll_max_tokens: int = 256            # low-latency (decode) points only up to this many tokens per rank
    a2a_capacity: int = 0               # padded all_to_all rows per destination (0: T, never drops)
    seed: int = 0
    check: bool = False                 # compare every baseline's results with jax_ep's
    hbm_bytes_per_s: float = 0.0        # 0: measure
    hbm_gib: float | None = None        # copy size of the measurement (None: 4 GiB on GPU, 1/16 on CPU)
    fail_fast: bool = False
    progress: bool = True

    @classmethod
    def tiny(cls, **overrides):
        """A CPU smoke sweep (seconds): the reference backend on virtual devices."""
        base = dict(tokens=(4, 32), hidden=(256,), topk=(2,), experts=(16,), loop=2, repeats=2,
                    ll_max_tokens=32, hbm_gib=1 / 64)
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class Work:
    """One work point: the same inputs for every implementation."""
    mode: str
    ranks: int
    tokens: int
    hidden: int
    topk: int
    experts: int

    def problem(self) -> str | None:
        """Why this combination cannot run, or None."""
        if self.experts % self.ranks:
            return f"experts={self.experts} not divisible by ranks={self.ranks}"
        if self.topk > self.experts:
            return f"topk={self.topk} > experts={self.experts}"
        if self.hidden % 8:
            return f"hidden={self.hidden} not a multiple of 8"
        return None


def row_bytes(hidden: int, dtype: str) -> int:
    return hidden + 4 * math.ceil(hidden / 128) if dtype == "fp8" else 2 * hidden


# ------------------------------------------------------------------------------------------------------------
# processes: single process, or the launcher's processes (python -m jax_ep.launch)

class Ranks:
    """Cross-process reductions through JAX's key-value store (no-ops in a single process). Every process
    must make the same calls in the same order."""

    _calls = 0  # per process, shared by all instances: keys are never reused

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.rank = jax.process_index()
        self._cache = {}

    def gather(self, value: str) -> list[str]:
        if not self.multi:
            return [value]
        from jax._src.distributed import global_state
        Ranks._calls += 1
        n, client = Ranks._calls, global_state.client
        client.key_value_set(f"jax_ep_bench/{n}/{self.rank}", value)
        return [client.blocking_key_value_get(f"jax_ep_bench/{n}/{r}", 600_000)
                for r in range(jax.process_count())]

    def all(self, flag: bool) -> bool:
        return all(v == "1" for v in self.gather("1" if flag else "0"))

    def max(self, value: float) -> float:
        return max(float(v) for v in self.gather(repr(float(value))))

    def barrier(self):
        self.gather("")


def launched() -> bool:
    return "JAX_EP_NUM_PROCESSES" in os.environ


def setup_launched():
    """In a process started by ``python -m jax_ep.launch``: join the group; returns (rank, R, mesh)."""
    from tests.gpu.harness import setup
    rank, nproc, mesh, _ = setup()
    return rank, nproc, mesh


def physical_devices(mesh, ranks: Ranks) -> int:
    """Distinct physical accelerators under the mesh (virtual CPU devices share one memory: 1)."""
    devs = list(mesh.devices.flat)
    if devs[0].platform == "cpu":
        return 1
    if not ranks.multi:
        return len(devs)
    if "physical" not in ranks._cache:  # the launcher pins each process to CUDA_VISIBLE_DEVICES; several
        ids = ranks.gather(f"{platform.node()}:{os.environ.get('CUDA_VISIBLE_DEVICES', '?')}")  # may share
        ranks._cache["physical"] = len(set(ids))
    return ranks._cache["physical"]


# ------------------------------------------------------------------------------------------------------------
# environment and limits

def _cmd(args, cwd=None) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=cwd)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Machine, accelerator, driver, software versions and git commit of this run."""
    import jaxlib
    devs = jax.devices()
    gpus = _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    commit = _cmd(["git", "rev-parse", "HEAD"], cwd=ROOT)
    dirty = None
    if commit:
        dirty = bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT))
    elif os.path.exists(os.path.join(ROOT, ".dev", "commit")):
        commit = open(os.path.join(ROOT, ".dev", "commit")).read().strip()
    try:
        from jax_ep import _cuda
        ext = _cuda.extension_error() or "available"
    except Exception as exc:  # noqa: BLE001
        ext = f"{type(exc).__name__}: {exc}"
    return dict(
        machine=dict(hostname=platform.node(), platform=platform.platform(),
                     processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count()),
        devices=dict(platform=devs[0].platform, kind=devs[0].device_kind, count=len(devs),
                     local_count=jax.local_device_count(), process_count=jax.process_count()),
        gpu=dict(nvidia_smi=gpus.splitlines()) if gpus else None,
        software=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                      jax_ep=jax_ep.__version__, numpy=np.__version__, cuda_extension=ext,
                      jax_ep_backend_env=os.environ.get("JAX_EP_BACKEND")),
        git=dict(commit=commit, dirty=dirty),
    )


def measure_peer_copy(devices, nbytes: int, repeats: int = 5) -> float | None:
    """Bytes/s of a device_put from devices[0] to devices[1] (one direction), or None with one device."""
    if len(devices) < 2:
        return None
    a = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), devices[0])
    jax.block_until_ready(jax.device_put(a, devices[1]))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(a, devices[1]))
        times.append(time.perf_counter() - t0)
    return a.nbytes / float(np.median(times))


def measure_limits(cfg: SweepConfig, mesh, ranks: Ranks) -> dict:
    """B (copy bandwidth, read + write) and the peer copy bandwidth, measured now (or B as given)."""
    import hbm_copy
    on_gpu = mesh.devices.flat[0].platform in ("gpu", "cuda")
    gib = cfg.hbm_gib or (4.0 if on_gpu else 1 / 16)
    limits = dict(physical_devices=physical_devices(mesh, ranks))
    if cfg.hbm_bytes_per_s:
        limits.update(hbm_copy_bytes_per_s=float(cfg.hbm_bytes_per_s), source="given (--hbm-bytes-per-s)")
    else:
        B = 0.0
        if ranks.rank == 0:  # one process measures; the others wait (under MPS it gets only its SM share)
            xla = hbm_copy.measure(gib=gib, repeats=5 if not on_gpu else 20)
            cp = hbm_copy.measure_memcpy(gib=gib) if on_gpu else None
            B = max(xla, cp or 0.0)
            limits.update(xla_elementwise_bytes_per_s=xla, cupy_copy_bytes_per_s=cp)
        B = ranks.max(B)
        how = "jnp elementwise copy (CPU: a memcpy-like number only)" if not on_gpu else \
            "hbm_copy.measure (XLA elementwise) and cudaMemcpy via CuPy if installed, the larger"
        if ranks.multi:
            how += "; measured by rank 0 while the others waited (under MPS: its SM share only, an underestimate)"
        limits.update(hbm_copy_bytes_per_s=B, source=f"measured, {gib:g} GiB: {how}")
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if len(local) >= 2 and limits["physical_devices"] > 1:
        limits["peer_copy_bytes_per_s"] = measure_peer_copy(local, int((256 if on_gpu else 16) * 2**20))
    return limits


def ceiling_bytes_per_s(limits: dict, op: str) -> float:
    B = limits.get("hbm_copy_bytes_per_s") or 0.0
    return limits.get("physical_devices", 1) * (B / 3 if op == "combine" else B / 4)


# ------------------------------------------------------------------------------------------------------------
# jit / shard_map plumbing: every global array is stacked [R, ...] over the ranks

def smap(mesh, fn):
    """jit(shard_map(fn)) over axis "ep": inputs and outputs are pytrees of [R, ...] stacked per rank."""
    def per_rank(*args):
        out = fn(*jax.tree.map(lambda a: a[0], args))
        return jax.tree.map(lambda a: a[None], out)
    return jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))


def looped(fn, n: int):
    """fn applied n times back to back in one program: once, then n-1 times in a fori_loop. The outputs are
    loop state (never dead code) and the inputs pass an optimization barrier with them every iteration (so
    the op is not loop-invariant and cannot be hoisted)."""
    def run(*args):
        out = fn(*args)

        def body(_, carry):
            a, _ = jax.lax.optimization_barrier(carry)
            return a, fn(*a)

        return jax.lax.fori_loop(0, n - 1, body, (args, out))[1]
    return run


def stacked(mesh, data: np.ndarray):
    """A global [R, ...] array sharded over "ep" from the same numpy data on every process."""
    return jax.make_array_from_callback(data.shape, NamedSharding(mesh, P(AXIS)), lambda index: data[index])


def make_mesh(num_ranks: int | None = None):
    devices = jax.devices()
    n = num_ranks or len(devices)
    if n > len(devices):
        raise ValueError(f"{n} ranks need {n} devices, have {len(devices)}")
    return Mesh(np.array(devices[:n]), (AXIS,))


# ------------------------------------------------------------------------------------------------------------
# inputs

def routing_numpy(ranks: int, tokens: int, topk: int, experts: int, seed: int = 0):
    """DeepEP's benchmark routing: scores |N(0,1)| + 1, each token's top-k experts; random weights.
    Returns idx [R, T, K] int32, weights [R, T, K] f32."""
    rng = np.random.default_rng(seed)
    scores = np.abs(rng.standard_normal((ranks, tokens, experts), dtype=np.float32)) + 1.0
    idx = np.argpartition(-scores, topk - 1, axis=-1)[..., :topk].astype(np.int32)
    w = rng.random((ranks, tokens, topk), dtype=np.float32)
    return idx, w


def traffic(idx: np.ndarray, ranks: int, experts: int) -> dict:
    """Received tokens (normal mode) and (token, expert) selections (low-latency), summed over ranks."""
    valid = idx >= 0
    owner = np.where(valid, idx // (experts // ranks), -1)
    in_rank = (owner[..., None] == np.arange(ranks)).any(axis=-2)        # [R, T, R_dst]
    return dict(recv_tokens=int(in_rank.sum()), selections=int(valid.sum()),
                recv_tokens_per_rank=in_rank.sum(axis=(0, 1)).astype(int).tolist())


def make_inputs(mesh, work: Work, seed: int = 0):
    """x [R, T, H] bf16 (drawn on the devices), idx [R, T, K] int32, w [R, T, K] f32, and the traffic."""
    idx, w = routing_numpy(work.ranks, work.tokens, work.topk, work.experts, seed)
    H = work.hidden

    def draw(r):
        key = jax.random.fold_in(jax.random.key(seed), r[0])
        return jax.random.normal(key, (1, work.tokens, H), jnp.float32).astype(jnp.bfloat16)

    def per_rank(r):
        return draw(r)

    x = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))(
        stacked(mesh, np.arange(work.ranks, dtype=np.int32)))
    return x, stacked(mesh, idx), stacked(mesh, w), traffic(idx, work.ranks, work.experts)


# ------------------------------------------------------------------------------------------------------------
# implementations (per-rank code)

class JaxEp:
    """jax_ep's dispatch / combine (normal: rank-major; low_latency: the decode calls)."""

    def __init__(self, mesh, work: Work, backend: str | None = None):
        self.mode, self.name = work.mode, "jax_ep" if backend is None else f"jax_ep_{backend}"
        self.buf = jax_ep.Buffer(mesh, AXIS, num_experts=work.experts, hidden=work.hidden,
                                 max_tokens_per_rank=work.tokens, num_topk=work.topk,
                                 low_latency=work.mode == "low_latency", backend=backend)

    def backend(self, op: str) -> str:
        """The backend jax_ep runs ``op`` on. Normal-mode combine runs where its dispatch ran (jax_ep.normal
        resolves "dispatch" only; the handle carries the choice), so both ops resolve "dispatch"."""
        from jax_ep import _backend
        name = "dispatch" if self.mode == "normal" else f"low_latency_{op}"
        return _backend.resolve(name, self.buf.backend, _backend.platform_of(self.buf))

    def casts(self, dtype) -> bool:
        """Whether the payload is cast before the op: normal-mode fp8 (DeepEP's normal mode casts outside
        dispatch); low-latency dispatch casts inside the op."""
        return self.mode == "normal" and dtype == "fp8"

    def payload(self, x, dtype):
        return jax_ep.per_token_cast_to_fp8(x) if self.casts(dtype) else x

    def dispatch(self, x, idx, w, dtype):
        if self.mode == "normal":
            return jax_ep.dispatch(self.buf, x, idx, w)
        return jax_ep.low_latency_dispatch(self.buf, x, idx, use_fp8=dtype == "fp8")

    def combine_input(self, out):
        """The rows to combine back and what combine needs of the dispatch (per-rank or stacked alike)."""
        return out.x, out.handle

    def combine(self, y, handle, idx, w):
        if self.mode == "normal":
            return jax_ep.combine(self.buf, y, handle)
        return jax_ep.low_latency_combine(self.buf, y, idx, w, handle)

    def received(self, out):
        """Canonical received rows of a stacked [R, ...] normal-mode output: x, scales, local ids, weights
        and the valid-row mask."""
        num_recv = _host(out.num_recv)
        valid = np.arange(out.x.shape[1])[None, :] < num_recv[:, None]
        return dict(x=out.x, x_scales=out.x_scales, topk_idx=out.topk_idx, topk_weights=out.topk_weights,
                    valid=valid)

    def close(self):
        self.buf.close()


class Baseline:
    """Adapter of a baselines.py class to the same interface."""

    def __init__(self, work: Work, name: str, capacity: int = 0, ragged_fn=None):
        self.mode, self.name = work.mode, name
        self.impl = baselines.make_baseline(name, AXIS, work.ranks, work.experts, capacity=capacity or None,
                                            ragged_fn=ragged_fn, mode=work.mode)

    def backend(self, op):
        fn = getattr(self.impl, "ragged_fn", None)
        if fn is not None and fn is not jax.lax.ragged_all_to_all:
            return f"xla, ragged_all_to_all replaced by {getattr(fn, '__name__', 'a stand-in')}"
        return "xla"

    def casts(self, dtype) -> bool:
        return self.mode == "normal" and dtype == "fp8"   # the decode work casts inside the op, like jax_ep

    def payload(self, x, dtype):
        return jax_ep.per_token_cast_to_fp8(x) if self.casts(dtype) else x

    def dispatch(self, x, idx, w, dtype):
        if self.mode == "low_latency":
            return self.impl.dispatch(x, idx, use_fp8=dtype == "fp8")
        return self.impl.dispatch(x, idx, w)

    def combine_input(self, out):
        return out["x"], out["state"]

    def combine(self, y, state, idx, w):
        if self.mode == "low_latency":
            return self.impl.combine(y, state, idx, w)
        return self.impl.combine(y, state)

    def received(self, out):
        return dict(x=out["x"], x_scales=out["x_scales"], topk_idx=out["topk_idx"],
                    topk_weights=out["topk_weights"], valid=out["row_valid"])

    def close(self):
        pass


def xla_collectives_usable(mesh, ranks: Ranks) -> bool:
    """False when several ranks (processes) share one GPU: XLA's (NCCL) collectives need a GPU per rank."""
    if not ranks.multi or mesh.devices.flat[0].platform == "cpu":
        return True
    return physical_devices(mesh, ranks) >= jax.process_count()


def skip_reason(name: str, work: Work, mesh, ranks: Ranks, auto_backends: dict) -> str | None:
    """Why implementation ``name`` does not run at this point, or None. ``auto_backends``: {op: backend}
    that jax_ep resolves to for this mode."""
    shared_gpu = "XLA collectives cannot run with several ranks (processes) on one GPU"
    if name == "jax_ep":
        if "reference" in auto_backends.values() and not xla_collectives_usable(mesh, ranks):
            return f"jax_ep runs {work.mode} on the reference backend here, and {shared_gpu}"
        return None
    if name == "jax_ep_reference":
        if all(b == "reference" for b in auto_backends.values()):
            return "jax_ep runs the reference backend here (same numbers as jax_ep)"
    elif work.mode != "normal" and name != "all_to_all_padded":
        return "the low-latency (decode) baseline is the padded all_to_all"
    if not xla_collectives_usable(mesh, ranks):
        return shared_gpu
    if name == "ragged_all_to_all":
        ok, why = baselines.ragged_all_to_all_support(mesh)
        if not ok:
            return why
    return None


def make_impl(name: str, mesh, work: Work, cfg: SweepConfig, ragged_fn=None):
    if name == "jax_ep":
        return JaxEp(mesh, work)
    if name == "jax_ep_reference":
        return JaxEp(mesh, work, backend="reference")
    return Baseline(work, name, capacity=cfg.a2a_capacity, ragged_fn=ragged_fn)


# ------------------------------------------------------------------------------------------------------------
# measuring one implementation at one work point

def _record(work: Work, impl: str, op: str, dtype: str, **fields) -> dict:
    rec = dict(mode=work.mode, op=op, dtype=dtype, impl=impl, ranks=work.ranks, tokens=work.tokens,
               hidden=work.hidden, topk=work.topk, experts=work.experts)
    rec.update(fields)
    return rec


def _finish(rec: dict, nbytes: int, op_s: float, jit_s: float, limits: dict) -> dict:
    ceiling = ceiling_bytes_per_s(limits, rec["op"])
    rec.update(status="ok", op_s=op_s, jit_s=jit_s, bytes=int(nbytes),
               GBps_op=nbytes / op_s / 1e9, GBps_jit=nbytes / jit_s / 1e9, jit_over_op=jit_s / op_s,
               ceiling_GBps=ceiling / 1e9 if ceiling else None,
               ratio_op=nbytes / op_s / ceiling if ceiling else None,
               ratio_jit=nbytes / jit_s / ceiling if ceiling else None)
    peer = limits.get("peer_copy_bytes_per_s")
    if peer and limits.get("physical_devices", 1) > 1:
        rec["ratio_op_to_peer_copy"] = nbytes / op_s / (peer * limits["physical_devices"])
    return rec


def measure_impl(impl, mesh, work: Work, inputs, traf: dict, cfg: SweepConfig, limits: dict, ranks: Ranks,
                 reference_rows=None, keep_rows: bool = False) -> list[dict]:
    """Dispatch (every dtype) and combine (bf16 rows) of one implementation; returns point records.

    ``reference_rows``: jax_ep's canonical received rows per dtype (host) to check this implementation
    against (sets ``agrees_with_jax_ep``); ``keep_rows``: return this implementation's rows and combine
    output in the records' private ``_rows`` / ``_combined`` fields (removed before writing)."""
    x, idx, w = inputs
    records, bf16_out = [], None
    unit = traf["recv_tokens"] if work.mode == "normal" else traf["selections"]
    for dtype in cfg.dtypes:
        rec = _record(work, impl.name, "dispatch", dtype, backend=impl.backend("dispatch"),
                      row_bytes=row_bytes(work.hidden, dtype), rows=unit)
        if dtype == "fp8" and work.hidden % 128:
            records.append(dict(rec, status="skipped", reason=f"fp8 needs hidden % 128 == 0 (H={work.hidden})"))
            continue
        payload = smap(mesh, lambda a, d=dtype: impl.payload(a, d))(x) if impl.casts(dtype) else x

        def one(p, i, ww, d=dtype):
            return impl.dispatch(p, i, ww, d)

        f_one = smap(mesh, one)
        out = f_one(payload, idx, w)
        t_op = ranks.max(time_call(smap(mesh, looped(one, cfg.loop)), payload, idx, w,
                                   repeats=cfg.repeats) / cfg.loop)
        t_jit = ranks.max(time_call(f_one, payload, idx, w, repeats=cfg.repeats))
        if isinstance(out, dict) and "dropped" in out:
            dropped = int(np.sum(_host(out["dropped"])))
            if dropped:
                rec["dropped_rows"] = dropped
        if work.mode == "normal" and (keep_rows or reference_rows is not None):
            rows = _host(impl.received(out))
            if reference_rows is not None and dtype in reference_rows:
                rec["agrees_with_jax_ep"] = ranks.all(same_received_rows(reference_rows[dtype], rows))
            if keep_rows:
                rec["_rows"] = rows
        records.append(_finish(rec, unit * rec["row_bytes"], t_op, t_jit, limits))
        if dtype == "bf16":
            bf16_out = out
        else:
            del out
    # combine: bf16 rows back along a bf16 dispatch (run untimed if bf16 was not in the sweep)
    rec = _record(work, impl.name, "combine", "bf16", backend=impl.backend("combine"),
                  row_bytes=row_bytes(work.hidden, "bf16"), rows=unit)
    if bf16_out is None:
        bf16_out = smap(mesh, lambda p, i, ww: impl.dispatch(p, i, ww, "bf16"))(x, idx, w)
    y, state = impl.combine_input(bf16_out)
    del bf16_out

    def comb(yy, st, i, ww):
        return impl.combine(yy, st, i, ww)

    f_comb = smap(mesh, comb)
    combined = f_comb(y, state, idx, w)
    t_op = ranks.max(time_call(smap(mesh, looped(comb, cfg.loop)), y, state, idx, w,
                               repeats=cfg.repeats) / cfg.loop)
    t_jit = ranks.max(time_call(f_comb, y, state, idx, w, repeats=cfg.repeats))
    if keep_rows or reference_rows is not None:
        rec["_combined"] = _host(combined)
    records.append(_finish(rec, unit * rec["row_bytes"], t_op, t_jit, limits))
    return records


def _host(tree):
    """numpy of this process's shards, stacked [local ranks, ...] (the whole array in one process)."""
    def one(a):
        if a is None or isinstance(a, np.ndarray):
            return a
        if a.is_fully_addressable:
            return np.asarray(a)
        return np.concatenate([np.asarray(s.data) for s in sorted(a.addressable_shards,
                                                                  key=lambda s: s.index[0].start or 0)])
    return jax.tree.map(one, tree)


def _row_bytes_view(rows: dict, r: int) -> np.ndarray:
    """Rank r's valid received rows as one opaque byte string each (x, scales, ids, weights)."""
    valid = np.asarray(rows["valid"][r], bool)
    parts = []
    for key in ("x", "x_scales", "topk_idx", "topk_weights"):
        a = rows.get(key)
        if a is None:
            continue
        a = np.ascontiguousarray(np.asarray(a[r])[valid])
        parts.append(a.reshape(a.shape[0], -1).view(np.uint8).reshape(a.shape[0], -1))
    flat = np.ascontiguousarray(np.concatenate(parts, axis=1))
    return flat.view(np.dtype((np.void, flat.shape[1]))).ravel()


def same_received_rows(a: dict, b: dict) -> bool:
    """Every rank received the same multiset of rows (payload, scales, local ids, weights) in a and b."""
    if a["valid"].shape[0] != b["valid"].shape[0]:
        return False
    for r in range(a["valid"].shape[0]):
        ra, rb = _row_bytes_view(a, r), _row_bytes_view(b, r)
        if ra.shape != rb.shape or not np.array_equal(np.sort(ra), np.sort(rb)):
            return False
    return True


# ------------------------------------------------------------------------------------------------------------
# the sweep

def works(cfg: SweepConfig, ranks_list) -> list[Work]:
    out = []
    for mode, R, T, H, K, E in itertools.product(cfg.modes, ranks_list, cfg.tokens, cfg.hidden, cfg.topk,
                                                 cfg.experts):
        out.append(Work(mode, int(R), int(T), int(H), int(K), int(E)))
    return out


def _progress(total: int, enabled: bool):
    try:
        from tqdm.std import tqdm
    except ImportError:  # tqdm is in the [test] extra; the sweep runs without it
        return None
    return tqdm(total=total, disable=not enabled, unit="impl", file=sys.stderr, dynamic_ncols=True)


def run_sweep(cfg: SweepConfig, *, mesh=None, ragged_fn=None) -> dict:
    """Run the sweep; returns the results dict (schema ``jax_ep.bench/1``; see ``write_results``).

    ``mesh``: the launcher harness's mesh (one rank per process); None: sub-meshes of the local devices for
    each entry of ``cfg.ranks`` (default all devices). ``ragged_fn`` replaces jax.lax.ragged_all_to_all
    (tests pass baselines.emulated_ragged_all_to_all to check the permutation code where XLA lacks it)."""
    ranks = Ranks()
    if mesh is not None:
        ranks_list = [mesh.shape[AXIS]]
        if cfg.ranks and tuple(cfg.ranks) != (mesh.shape[AXIS],):
            raise ValueError(f"--ranks {cfg.ranks} differs from the {mesh.shape[AXIS]} launched processes")
    else:
        ranks_list = list(cfg.ranks or (len(jax.devices()),))
    for name in cfg.impls:
        if name not in IMPLS:
            raise ValueError(f"unknown implementation {name!r} (one of {IMPLS})")
    meshes = {R: mesh if mesh is not None else make_mesh(R) for R in ranks_list}
    limit_mesh = meshes[max(ranks_list)]
    t0 = time.time()
    limits = measure_limits(cfg, limit_mesh, ranks)
    plan = works(cfg, ranks_list)
    impls = [n for n in IMPLS if n in cfg.impls]
    if "jax_ep" not in impls and cfg.check:
        raise ValueError("check=True compares with jax_ep: keep jax_ep in impls")
    bar = _progress(len(plan) * len(impls), cfg.progress and ranks.rank == 0)
    points, skipped_impls = [], {}
    for work in plan:
        m = meshes[work.ranks]
        problem = work.problem()
        if problem is None and work.mode == "low_latency" and work.tokens > cfg.ll_max_tokens:
            problem = f"low-latency points only up to --ll-max-tokens={cfg.ll_max_tokens} tokens per rank"
        if problem:
            for name in impls:
                points.append(_record(work, name, "*", "*", status="skipped", reason=problem))
            if bar:
                bar.update(len(impls))
            continue
        reference_rows = reference_comb = None
        try:
            *inputs, traf = make_inputs(m, work, cfg.seed)
            jep = JaxEp(m, work)
            auto = {op: jep.backend(op) for op in ("dispatch", "combine")}
        except Exception as exc:  # noqa: BLE001
            if cfg.fail_fast:
                raise
            for name in impls:
                points.append(_record(work, name, "*", "*", status="error", reason=_err(exc)))
            if bar:
                bar.update(len(impls))
            continue
        for name in impls:
            if bar:
                bar.set_postfix_str(f"{work.mode} R={work.ranks} T={work.tokens} H={work.hidden} {name}")
            why = skip_reason(name, work, m, ranks, auto)
            if name == "ragged_all_to_all" and ragged_fn is not None and why and "unavailable" in why:
                why = None  # the stand-in runs where the real op does not (tests)
            if why:
                skipped_impls.setdefault(name, why)
                points.append(_record(work, name, "*", "*", status="skipped", reason=why))
                if bar:
                    bar.update(1)
                continue
            impl = None
            check = cfg.check and work.mode == "normal"
            try:
                impl = make_impl(name, m, work, cfg, ragged_fn=ragged_fn if name == "ragged_all_to_all" else None)
                recs = measure_impl(impl, m, work, inputs, traf, cfg, limits, ranks,
                                    reference_rows=reference_rows if check and name != "jax_ep" else None,
                                    keep_rows=check and name == "jax_ep")
                if check and name == "jax_ep":
                    reference_rows = {r["dtype"]: r["_rows"] for r in recs if "_rows" in r}
                    reference_comb = next((r["_combined"] for r in recs if "_combined" in r), None)
                for r in recs:
                    comb = r.pop("_combined", None)
                    r.pop("_rows", None)
                    if check and name != "jax_ep" and comb is not None and reference_comb is not None:
                        r["agrees_with_jax_ep"] = ranks.all(bool(np.allclose(
                            comb.astype(np.float32), reference_comb.astype(np.float32), rtol=2e-2, atol=2e-2)))
                points.extend(recs)
            except Exception as exc:  # noqa: BLE001
                if cfg.fail_fast:
                    raise
                points.append(_record(work, name, "*", "*", status="error", reason=_err(exc)))
            finally:
                if impl is not None:
                    impl.close()
                gc.collect()
            if bar:
                bar.update(1)
        jep.close()
        del inputs
        gc.collect()
    if bar:
        bar.close()
    config = dataclasses.asdict(cfg)
    config["ranks"] = ranks_list
    config["harness"] = "launch (one rank per process)" if ranks.multi else "single process (one rank per device)"
    return dict(schema=SCHEMA, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **environment(), config=config, limits=limits, conventions=CONVENTIONS,
                skipped_implementations=skipped_impls, wall_s=time.time() - t0, points=points)


def _err(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


# ------------------------------------------------------------------------------------------------------------
# output

def default_out_path(results: dict) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    kind = results["devices"]["kind"].lower().replace("nvidia ", "")
    kind = "".join(c if c.isalnum() else "-" for c in kind).strip("-") or results["devices"]["platform"]
    return os.path.join(RESULTS_DIR, f"{stamp}_{kind}_bench.json")


def write_results(results: dict, path: str | None = None) -> str:
    path = path or default_out_path(results)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1, default=_json_default)
        fh.write("\n")
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def ok_points(results: dict) -> list[dict]:
    return [p for p in results["points"] if p.get("status") == "ok"]


def speedups(results: dict) -> dict:
    """(mode, op, dtype, R, T, H, K, E) -> {impl: time / jax_ep's time} (kernel-side), > 1: jax_ep faster."""
    key = ("mode", "op", "dtype", "ranks", "tokens", "hidden", "topk", "experts")
    by = {}
    for p in ok_points(results):
        by.setdefault(tuple(p[k] for k in key), {})[p["impl"]] = p["op_s"]
    out = {}
    for k, times in by.items():
        if "jax_ep" in times:
            out[k] = {name: t / times["jax_ep"] for name, t in times.items() if name != "jax_ep"}
    return out


def format_table(results: dict) -> str:
    """Plain-text table of the measured points (and a count of skipped ones with their reasons)."""
    rows = [("mode", "op", "dtype", "impl", "R", "T", "H", "K", "E", "op_us", "jit_us", "GB/s op", "GB/s jit",
             "x ceil", "jax_ep x")]
    sp = speedups(results)
    for p in ok_points(results):
        k = (p["mode"], p["op"], p["dtype"], p["ranks"], p["tokens"], p["hidden"], p["topk"], p["experts"])
        vs = sp.get(k, {}).get(p["impl"])
        rows.append((p["mode"], p["op"], p["dtype"], p["impl"], p["ranks"], p["tokens"], p["hidden"], p["topk"],
                     p["experts"], f"{p['op_s'] * 1e6:.1f}", f"{p['jit_s'] * 1e6:.1f}", f"{p['GBps_op']:.2f}",
                     f"{p['GBps_jit']:.2f}", "-" if p["ratio_op"] is None else f"{p['ratio_op']:.3f}",
                     "" if vs is None else f"{vs:.2f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).rjust(wd) for v, wd in zip(r, widths)) for r in rows]
    lim = results["limits"]
    lines.append(f"B = {lim.get('hbm_copy_bytes_per_s', 0) / 1e9:.1f} GB/s copy ({lim.get('source')}); "
                 f"ceiling = {lim.get('physical_devices')} x B/4 (dispatch), B/3 (combine). "
                 "'jax_ep x' = the implementation's time / jax_ep's (kernel-side).")
    reasons = {}
    for p in results["points"]:
        if p.get("status") != "ok":
            reasons.setdefault(f"{p['status']}: {p.get('reason')}", set()).add(p["impl"])
    for why, names in sorted(reasons.items()):
        lines.append(f"{why} [{', '.join(sorted(names))}]")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# command line

def _ints(text):
    return tuple(int(v) for v in text.split(",") if v.strip())


def _names(text):
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SweepConfig()
    p.add_argument("--tokens", type=_ints, default=None, help=f"tokens per rank, comma-separated ({_csv(d.tokens)})")
    p.add_argument("--hidden", type=_ints, default=None, help=_csv(d.hidden))
    p.add_argument("--topk", type=_ints, default=None, help=_csv(d.topk))
    p.add_argument("--experts", type=_ints, default=None, help=_csv(d.experts))
    p.add_argument("--dtypes", type=_names, default=None, help=_csv(d.dtypes))
    p.add_argument("--modes", type=_names, default=None, help=_csv(d.modes))
    p.add_argument("--ranks", type=_ints, default=None,
                   help="EP sizes (single process: sub-meshes of the local devices; default all of them)")
    p.add_argument("--impls", type=_names, default=None, help=_csv(IMPLS))
    p.add_argument("--loop", type=int, default=None, help=f"ops per jitted loop for the kernel-side time ({d.loop})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed calls per point ({d.repeats})")
    p.add_argument("--ll-max-tokens", type=int, default=None, help=f"({d.ll_max_tokens})")
    p.add_argument("--a2a-capacity", type=int, default=None,
                   help="padded all_to_all rows per destination rank (0: tokens per rank, never drops)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--check", action="store_true", help="check the baselines' results against jax_ep's")
    p.add_argument("--hbm-bytes-per-s", type=float, default=None,
                   help="copy bandwidth B to use instead of measuring it (e.g. from benchmarks/hbm_copy.py)")
    p.add_argument("--hbm-gib", type=float, default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke defaults (SweepConfig.tiny; explicit options win)")
    p.add_argument("--fail-fast", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="", help="results JSON (default: benchmarks/results/<time>_<device>_bench.json)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--plot", action="store_true", help="also render <out>.png with plot.py")
    return p.parse_args(argv)


def _csv(values) -> str:
    return "default " + ",".join(str(v) for v in values)


def config_from_args(args) -> SweepConfig:
    fields = ("tokens", "hidden", "topk", "experts", "dtypes", "modes", "ranks", "impls", "loop", "repeats",
              "ll_max_tokens", "a2a_capacity", "seed", "hbm_bytes_per_s", "hbm_gib")
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    given.update(check=args.check, fail_fast=args.fail_fast, progress=not args.no_progress)
    return SweepConfig.tiny(**given) if args.tiny else SweepConfig(**given)


def main(argv=None) -> int:
    args = parse_args(argv)
    mesh = None
    if launched():
        _, _, mesh = setup_launched()
    cfg = config_from_args(args)
    results = run_sweep(cfg, mesh=mesh)
    if jax.process_index() != 0:
        return 0
    print(format_table(results), flush=True)
    if not args.no_write:
        path = write_results(results, args.out or None)
        print(f"wrote {path}", flush=True)
        if args.plot:
            import plot
            png = plot.plot_sweep(results, os.path.splitext(path)[0] + ".png")
            print(f"wrote {png}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
