"""benchmarks/: bench.py's functions on a tiny sweep, the baselines against jax_ep, the CLI, the plots, and the
notebook executed top to bottom (nbclient, TINY sizes, reference backend on the virtual CPU devices)."""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import baselines  # noqa: E402
import bench  # noqa: E402
import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOP_LEVEL = ("schema", "created", "machine", "devices", "gpu", "software", "git", "config", "limits", "conventions",
             "skipped_implementations", "points")
POINT_FIELDS = ("mode", "op", "dtype", "impl", "ranks", "tokens", "hidden", "topk", "experts", "status", "backend",
                "op_s", "jit_s", "bytes", "row_bytes", "GBps_op", "GBps_jit", "ceiling_GBps", "ratio_op",
                "ratio_jit")


def _is_png(path):
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_MAGIC and os.path.getsize(path) > 10_000


@pytest.fixture(scope="module")
def sweep():
    """Normal + low-latency, bf16 + fp8, R=4, every implementation, results checked against jax_ep.
    ragged_all_to_all runs on its all_to_all stand-in where XLA lacks it (XLA:CPU)."""
    cfg = bench.SweepConfig.tiny(tokens=(8,), ranks=(4,), check=True, progress=False)
    return bench.run_sweep(cfg, ragged_fn=baselines.emulated_ragged_all_to_all)


def test_sweep_schema_and_numbers(sweep, tmp_path):
    for key in TOP_LEVEL:
        assert key in sweep, key
    assert sweep["schema"] == bench.SCHEMA
    assert sweep["software"]["jax"] == jax.__version__ and sweep["software"]["jaxlib"]
    assert "commit" in sweep["git"] and sweep["devices"]["platform"] == "cpu"
    assert sweep["config"]["ranks"] == [4] and sweep["limits"]["hbm_copy_bytes_per_s"] > 0
    ok = bench.ok_points(sweep)
    got = {(p["mode"], p["impl"], p["op"], p["dtype"]) for p in ok}
    want = {("normal", impl, op, dt) for impl in ("jax_ep", "all_to_all_padded", "ragged_all_to_all")
            for op, dt in (("dispatch", "bf16"), ("dispatch", "fp8"), ("combine", "bf16"))}
    want |= {("low_latency", impl, op, dt) for impl in ("jax_ep", "all_to_all_padded")
             for op, dt in (("dispatch", "bf16"), ("dispatch", "fp8"), ("combine", "bf16"))}
    assert got == want
    for p in ok:
        for field in POINT_FIELDS:
            assert field in p, field
        for field in ("op_s", "jit_s", "bytes", "GBps_op", "GBps_jit", "ceiling_GBps", "ratio_op", "ratio_jit"):
            assert p[field] > 0, (field, p)
        assert p["bytes"] == p["rows"] * p["row_bytes"]
        H = p["hidden"]
        assert p["row_bytes"] == (H + 4 * H // 128 if p["dtype"] == "fp8" else 2 * H)
        if p["impl"] != "jax_ep" and p["mode"] == "normal":   # decode baseline: its own test below
            assert p["agrees_with_jax_ep"] is True, p
    for p in sweep["points"]:
        if p["status"] != "ok":
            assert p["status"] == "skipped" and p["reason"], p
    # the same work is charged the same bytes, whoever does it
    by_work = {}
    for p in ok:
        by_work.setdefault((p["mode"], p["op"], p["dtype"]), set()).add(p["bytes"])
    assert all(len(v) == 1 for v in by_work.values())
    assert "jax_ep_reference" in sweep["skipped_implementations"]   # jax_ep already runs it here
    table = bench.format_table(sweep)
    assert "all_to_all_padded" in table and "low_latency" in table
    # JSON round trip and the figures
    path = bench.write_results(sweep, str(tmp_path / "sweep.json"))
    assert json.load(open(path))["points"] == json.loads(json.dumps(sweep["points"]))
    pngs = plot.plot_all(plot.load(path), str(tmp_path / "sweep.png"))
    assert pngs and all(_is_png(p) for p in pngs)


def test_deepep_byte_conventions_match_jax_ep_counts():
    """traffic(): received tokens (normal) = jax_ep's num_recv summed over ranks; selections (low-latency) =
    the low-latency counts summed over ranks."""
    work = bench.Work("normal", 4, 16, 128, 3, 16)
    mesh = bench.make_mesh(4)
    x, idx, w, traf = bench.make_inputs(mesh, work, seed=3)
    buf = jax_ep_buffer(mesh, work, low_latency=True)

    def counts(xx, ii, ww):
        import jax_ep
        return jax_ep.dispatch(buf, xx, ii, ww).num_recv, jax_ep.low_latency_dispatch(buf, xx, ii).count

    num_recv, ll_count = bench.smap(mesh, counts)(x, idx, w)
    assert int(np.sum(np.asarray(num_recv))) == traf["recv_tokens"] > 0
    assert int(np.sum(np.asarray(ll_count))) == traf["selections"] == 4 * 16 * 3
    assert traf["recv_tokens_per_rank"] == list(np.asarray(num_recv).astype(int))


def jax_ep_buffer(mesh, work, low_latency=False):
    import jax_ep
    return jax_ep.Buffer(mesh, num_experts=work.experts, hidden=work.hidden, max_tokens_per_rank=work.tokens,
                         num_topk=work.topk, low_latency=low_latency)


def test_padded_all_to_all_receives_jax_eps_rows():
    """Independently of the sweep's check: per rank, the padded all_to_all baseline receives the same multiset
    of rows (payload, local ids, weights) as jax_ep's dispatch, and the comparison does see a changed row."""
    work = bench.Work("normal", 4, 12, 128, 3, 8)
    mesh = bench.make_mesh(4)
    x, idx, w, traf = bench.make_inputs(mesh, work, seed=5)
    jep, pad = bench.JaxEp(mesh, work), bench.Baseline(work, "all_to_all_padded")
    rows = {}
    for impl in (jep, pad):
        out = bench.smap(mesh, lambda a, i, ww, impl=impl: impl.dispatch(a, i, ww, "bf16"))(x, idx, w)
        rows[impl.name] = bench._host(impl.received(out))
    a, b = rows["jax_ep"], rows["all_to_all_padded"]
    assert a["valid"].sum() == b["valid"].sum() == traf["recv_tokens"]
    assert bench.same_received_rows(a, b)
    # rank-major order is the same too (source rank, then token) once the padding is squeezed out
    for r in range(4):
        np.testing.assert_array_equal(np.asarray(a["x"][r])[a["valid"][r]], np.asarray(b["x"][r])[b["valid"][r]])
    changed = dict(b, topk_weights=np.array(b["topk_weights"]))
    r, row = 1, int(np.flatnonzero(b["valid"][1])[0])
    changed["topk_weights"][r, row, 0] += 1.0
    assert not bench.same_received_rows(a, changed)


@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_jax_ep_backend_is_what_the_library_runs(mode, monkeypatch):
    """bench.JaxEp.backend names the backend jax_ep's own entry points resolve (it once asked for a normal-mode
    "combine" op, which the registry does not list, got "reference", and skipped every normal point on GPUs)."""
    from jax_ep import _backend, _cuda
    monkeypatch.delenv("JAX_EP_BACKEND", raising=False)   # auto, as on a user's GPU machine
    monkeypatch.setattr(_backend, "platform_of", lambda buf: "gpu")
    monkeypatch.setattr(_cuda, "available", lambda: True)
    work = bench.Work(mode, 4, 8, 128, 2, 8)
    jep = bench.JaxEp(bench.make_mesh(4), work)
    assert {op: jep.backend(op) for op in ("dispatch", "combine")} == {"dispatch": "cuda", "combine": "cuda"}


def test_emulated_ragged_all_to_all_semantics():
    """The CPU stand-in follows jax.lax.ragged_all_to_all's documented semantics (numpy model)."""
    R, M, H = 4, 6, 3
    mesh = bench.make_mesh(R)
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 3, (R, R)).astype(np.int32)                  # [src, dst]
    in_off = (np.cumsum(sizes, 1) - sizes).astype(np.int32)
    out_off = (np.cumsum(sizes, 0) - sizes).astype(np.int32)              # sender-side offsets at receivers
    recv = sizes.T.copy()                                                 # [me, src]
    data = rng.standard_normal((R, M, H)).astype(np.float32)
    fill = np.full((R, R * 3, H), -1.0, np.float32)

    def f(d, o, io, s, oo, rs):
        return baselines.emulated_ragged_all_to_all(d, o, io, s, oo, rs, axis_name=bench.AXIS)

    got = np.asarray(bench.smap(mesh, f)(*(bench.stacked(mesh, a) for a in (data, fill, in_off, sizes, out_off,
                                                                             recv))))
    want = fill.copy()
    for s in range(R):
        for d in range(R):
            n = sizes[s, d]
            want[d, out_off[s, d]:out_off[s, d] + n] = data[s, in_off[s, d]:in_off[s, d] + n]
    np.testing.assert_array_equal(got, want)


def test_ragged_all_to_all_availability_is_recorded(tmp_path, capsys):
    """The CLI: a JSON with the points; ragged_all_to_all either runs or is skipped with the backend's reason
    (XLA:CPU lacks it in jax 0.10); --plot renders the figure next to the JSON."""
    out = tmp_path / "cli.json"
    assert bench.main(["--tiny", "--ranks", "2", "--modes", "normal", "--dtypes", "bf16", "--tokens", "4",
                       "--impls", "jax_ep,ragged_all_to_all", "--no-progress", "--out", str(out), "--plot"]) == 0
    res = json.load(open(out))
    assert _is_png(str(tmp_path / "cli.png"))
    assert "jax_ep" in capsys.readouterr().out
    ragged = [p for p in res["points"] if p["impl"] == "ragged_all_to_all"]
    supported, reason = baselines.ragged_all_to_all_support(bench.make_mesh(2))
    if supported:
        assert all(p["status"] == "ok" for p in ragged)
    else:
        assert "ragged_all_to_all" in reason
        assert ragged and all(p["status"] == "skipped" and p["reason"] == reason for p in ragged)
        assert res["skipped_implementations"]["ragged_all_to_all"] == reason


def test_h200_figure_and_readme(tmp_path):
    png = plot.plot_h200_normal(path=str(tmp_path / "h200.png"))
    assert _is_png(png)
    assert os.path.exists(plot.H200_PNG)
    readme = open(os.path.join(ROOT, "README.md")).read()
    perf = readme[readme.index("## Performance"):]
    assert os.path.relpath(plot.H200_PNG, ROOT) in perf and "benchmarks/bench.py" in perf


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    path = os.path.join(BENCH_DIR, "ep_benchmarks.ipynb")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook unexecuted"
    assert "TINY" in nb.cells[1].source
    out = tmp_path / "nb.json"
    monkeypatch.setenv("JAX_EP_BENCH_TINY", "1")
    monkeypatch.setenv("JAX_EP_BENCH_OUT", str(out))
    monkeypatch.setenv("JAX_EP_BACKEND", "reference")
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": BENCH_DIR}})
    client.execute()
    res = json.load(open(out))
    assert {p["mode"] for p in bench.ok_points(res)} == {"normal", "low_latency"}
    assert _is_png(str(tmp_path / "nb.png"))
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) >= 2


def test_launch_harness_dry_run(tmp_path, monkeypatch):
    """``python -m jax_ep.launch --nproc 2 -- python benchmarks/bench.py``: one rank per process, times reduced
    over the processes through the key-value store, rank 0 writes the JSON (CPU rehearsal: JAX_EP_DRYRUN)."""
    from jax_ep.launch import launch
    out = tmp_path / "launch.json"
    monkeypatch.setenv("JAX_EP_DRYRUN", "1")
    monkeypatch.setenv("JAX_EP_BACKEND", "reference")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("XLA_FLAGS", raising=False)   # the harness gives each process its own CPU devices
    cmd = [sys.executable, os.path.join(BENCH_DIR, "bench.py"), "--tiny", "--modes", "normal", "--dtypes", "bf16",
           "--tokens", "4", "--impls", "jax_ep,all_to_all_padded", "--check", "--no-progress", "--out", str(out)]
    assert launch(2, cmd, timeout=120, gpus=["0", "1"]) == 0
    res = json.load(open(out))
    assert res["devices"]["process_count"] == 2 and res["config"]["harness"].startswith("launch")
    assert res["config"]["ranks"] == [2]
    ok = bench.ok_points(res)
    assert {(p["impl"], p["op"]) for p in ok} == {(i, o) for i in ("jax_ep", "all_to_all_padded")
                                                  for o in ("dispatch", "combine")}
    assert all(p["agrees_with_jax_ep"] for p in ok if p["impl"] != "jax_ep")


def test_bench_normal_profile_dry_run(tmp_path, monkeypatch):
    """bench_normal.py --profile in the launcher harness (CPU rehearsal): every rank's kernel table reaches
    rank 0's JSON (empty on CPU, where the trace has no GPU plane), next to the usual figures."""
    from jax_ep.launch import launch
    out = tmp_path / "normal.json"
    monkeypatch.setenv("JAX_EP_DRYRUN", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cmd = [sys.executable, os.path.join(BENCH_DIR, "bench_normal.py"), "--tokens", "8", "--hidden", "256",
           "--experts", "8", "--topk", "2", "--loop", "2", "--repeats", "1", "--profile", "--out", str(out)]
    assert launch(2, cmd, timeout=180, gpus=["0", "1"]) == 0
    res = json.load(open(out))["results"]
    for op in ("dispatch_bf16", "dispatch_fp8", "combine_bf16"):
        per_rank = res[op]["kernels_per_rank"]
        assert len(per_rank) == 2 and all("_span_us_per_op" in k for k in per_rank)


def test_bench_low_latency_dry_run(tmp_path, monkeypatch):
    """bench_low_latency.py in the launcher harness (CPU rehearsal, reference backend): every section's rounds trace
    and run, the hooked ones (a GEMM between each send and its receive) and the one-sender ones (R=2) included, and
    rank 0 writes the JSON."""
    from jax_ep.launch import launch
    out = tmp_path / "ll.json"
    monkeypatch.setenv("JAX_EP_DRYRUN", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cmd = [sys.executable, os.path.join(BENCH_DIR, "bench_low_latency.py"), "--tokens", "8", "--hidden", "256",
           "--experts", "16", "--loop", "2", "--repeats", "1", "--num-sms", "24", "--out", str(out)]
    assert launch(2, cmd, timeout=240, gpus=["0", "1"]) == 0
    run = json.load(open(out))
    assert run["config"]["ranks"] == 2 and run["config"]["num_sms"] == 24 and run["floor_bytes"]["combine"] > 0
    assert set(run["results"]["overlap_s"]) == {"overlapped", "serial", "dispatch_alone", "matmul_alone"}


def test_internode_model_counts():
    """The internode byte model: a token crosses the network at most once per remote node, and never more
    often than the group limit allows."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "internode_model.py")
    spec = importlib.util.spec_from_file_location("internode_model", path)
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    one = model.simulate(1, 4, 64, 256, 4, 32, 4, 2)
    assert one["network_bytes"] == 0 and one["recv_rows"] > 0
    m = model.simulate(4, 2, 64, 256, 4, 32, 4, 2, fp8=True)
    assert 0 < m["avg_remote_nodes"] <= 2            # topk_group=2 groups = at most 2 nodes, one may be local
    assert m["row_bytes"] == 256 + 2 * 4
    assert m["network_bytes"] == round(m["avg_remote_nodes"] * 64) * m["row_bytes"]
    assert 1 <= m["avg_dest_gpus"] <= 4


def test_low_latency_padded_all_to_all_matches_jax_ep():
    """The decode-mode baseline delivers jax_ep's rows (padded per source instead of compacted) and combines
    to the same result."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import baselines
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    import jax_ep
    R, T, H, K, E = 4, 16, 256, 4, 16
    mesh = Mesh(np.array(jax.devices()[:R]), ("ep",))
    rng = np.random.default_rng(3)
    idx = rng.integers(-1, E, (R * T, K)).astype(np.int32)
    idx[::7, 1] = idx[::7, 0]                               # a repeated expert in some tokens
    w = rng.random((R * T, K)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((R * T, H)), jnp.bfloat16)
    buf = jax_ep.Buffer(mesh, num_experts=E, hidden=H, max_tokens_per_rank=T, num_topk=K, low_latency=True,
                        backend="reference")
    base = baselines.LowLatencyPaddedAllToAll("ep", R, E)

    def fn(x, i, w):
        got = base.dispatch(x, i, use_fp8=True)
        want = jax_ep.low_latency_dispatch(buf, x, i)
        y_got = (jax_ep.per_token_cast_back(got["x"], got["x_scales"]) * 0.5).astype(jnp.bfloat16)
        y_want = (jax_ep.per_token_cast_back(want.x, want.x_scales) * 0.5).astype(jnp.bfloat16)
        return (jax.lax.bitcast_convert_type(got["x"], jnp.uint8), got["layout_range"],
                jax.lax.bitcast_convert_type(want.x, jnp.uint8), want.handle.layout_range,
                base.combine(y_got, got["state"], i, w), jax_ep.low_latency_combine(buf, y_want, i, w, want.handle))
    outs = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 6))(x, idx, w)
    gx, glr, wx, wlr, gy, wy = (np.asarray(o) for o in outs)
    np.testing.assert_array_equal(glr, wlr)
    E_loc = E // R
    for e in range(R * E_loc):                              # every (rank, local expert) buffer
        lr = wlr[e]
        padded = np.concatenate([gx[e, s * T:s * T + lr[s]] for s in range(R)])
        np.testing.assert_array_equal(padded, wx[e, :lr.sum()])
    np.testing.assert_array_equal(gy, wy)


def test_ipc_scatter_plan_matches_the_kernels_slots():
    """benchmarks/micro/ipc_scatter.py (GPU-only timing) lays rows out as cuda/intranode.cu does: per destination,
    every source's rows are a contiguous block after lower sources', in token order, covering [0, received);
    its pull plan names, for every slot, the (source, token) the push plan put there."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ipc_scatter", os.path.join(BENCH_DIR, "micro", "ipc_scatter.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    R, T = 4, 64
    member = mod.membership(R, T)
    plans = [mod.plan(r, member) for r in range(R)]
    received = plans[0][1]
    for d in range(R):
        got = np.concatenate([s[:, d][s[:, d] >= 0] for s, _ in plans])
        np.testing.assert_array_equal(got, np.arange(received[d]))   # source-major, token order, no gaps
        pull = mod.gather_plan(d, member)
        assert len(pull) == received[d]
        for s, (slots, _) in enumerate(plans):
            t = np.flatnonzero(slots[:, d] >= 0)
            np.testing.assert_array_equal(pull[slots[t, d]], s * T + t)
    assert all((s >= 0).any(axis=1).all() for s, _ in plans)        # every token goes somewhere (top-8 of 256)


def test_low_latency_round_statistics_leave_out_each_calls_first_round():
    """The low-latency benchmark's headline: medians over rounds, every call's first round (which waits for the
    last process to start the call) left out; receive waits from start to mid."""
    sys.path.insert(0, ROOT)
    from tests.gpu.harness import round_statistics
    us = 1000
    call = {"dispatch_send": [(0, 0, 5 * us, 10 * us), (100 * us, 100 * us, 105 * us, 110 * us),
                              (200 * us, 200 * us, 205 * us, 230 * us)],
            "dispatch_recv": [(10 * us, 10 * us, 900 * us, 1000 * us), (110 * us, 111 * us, 115 * us, 130 * us),
                              (230 * us, 230 * us, 240 * us, 250 * us)]}
    median, p90 = round_statistics([call, call])
    assert median["dispatch_send"] == pytest.approx(20e-6)       # rounds 2-3 of each call: 10 and 30 us
    assert median["dispatch_recv"] == pytest.approx(20e-6)       # 20 and 20 us; the 990 us first round is out
    assert median["dispatch_recv_wait"] == pytest.approx(7.5e-6)  # 5 and 10 us
    assert p90["dispatch_send"] == pytest.approx(30e-6)
    assert median["dispatch"] == pytest.approx(40e-6)             # send + receive: 10 + 20 and 30 + 20 us
    assert median["dispatch_span"] == pytest.approx(40e-6)        # no gaps in these rounds


def test_low_latency_op_time_counts_an_overlap_once():
    """A receive that starts before its send has ended (programmatic dependent launch, measured and dropped in the
    eighth session) counts once: the op's kernel time is the union of the two kernels' intervals, its span from
    send start to receive end."""
    sys.path.insert(0, ROOT)
    from tests.gpu.harness import round_statistics
    us = 1000
    call = {"combine_send": [(0, 0, 8 * us, 10 * us)], "combine_recv": [(5 * us, 5 * us, 12 * us, 20 * us)],
            "dispatch_send": [(30 * us, 30 * us, 38 * us, 40 * us)], "dispatch_recv": [(44 * us, 44 * us, 45 * us, 50 * us)]}
    median, _ = round_statistics([call], skip_first=False)
    assert median["combine"] == pytest.approx(20e-6)              # [0, 10] and [5, 20]: 20 us, not 25
    assert median["combine_span"] == pytest.approx(20e-6)
    assert median["dispatch"] == pytest.approx(16e-6)             # 10 + 6 us; the 4 us launch gap is not kernel time
    assert median["dispatch_span"] == pytest.approx(20e-6)


def test_low_latency_timeline_words():
    """The runtime's timeline parser: slot s, kernel k at word 18 + (s * 4 + k) * 4; incomplete slots dropped,
    ops oldest first."""
    from jax_ep.cuda_backend.runtime import IntranodeRuntime
    raw = [0] * (18 + 32 * 4 * 4)
    def put(slot, kernel, words):
        at = 18 + (slot * 4 + kernel) * 4
        raw[at:at + 4] = words
    put(3, 1, [500, 510, 520, 600])     # dispatch_recv, newer
    put(2, 1, [100, 110, 120, 200])     # dispatch_recv, older
    put(4, 1, [700, 700, 0, 650])       # still running: its end is an older op's
    put(2, 2, [300, 300, 310, 400])     # combine_send
    tl = IntranodeRuntime.timeline_from_words(raw)
    assert tl["dispatch_recv"] == [(100, 110, 120, 200), (500, 510, 520, 600)]
    assert tl["combine_send"] == [(300, 300, 310, 400)]
    assert tl["dispatch_send"] == [] and tl["combine_recv"] == []


def test_low_latency_send_overlap_bins():
    """ll_overlap.py: a rank's send is charged the time another rank spent in a send, or in a receive after its wait
    (its copy); the receive's wait and the rank's own kernels are not counted, nor each call's first round."""
    import ll_overlap
    first = {"combine_send": [0, 0, 0, 1]}
    rank0 = [first, {"combine_send": [100, 100, 108, 110], "combine_recv": [112, 112, 115, 120]}]
    rank1 = [first, {"dispatch_recv": [90, 90, 104, 106],       # copying 104-106: 2 us of rank 0's send
                     "combine_send": [107, 107, 113, 115],      # 107-110: 3 us of rank 0's send
                     "combine_recv": [116, 116, 121, 125]}]     # copying from 121: after rank 0's send
    samples = sorted(ll_overlap.send_samples([rank0, rank1], "combine"))
    assert samples == [(3.0, 8), (5.0, 10)]   # rank 1's send (rank 0's send ends at 110, its copy starts at 115); rank 0's


def test_low_latency_overlap_picks_the_rounds(tmp_path, capsys):
    """ll_overlap.py --rounds reads the timeline of the rounds asked for (straight-line, hooked or one-sender) and
    skips runs whose ranks are on several GPUs."""
    import ll_overlap
    first = {"combine_send": [0, 0, 0, 1]}
    def timeline(send_us):
        return [[first, {"combine_send": [100, 100, 100, 100 + send_us]}],
                [first, {"combine_send": [200, 200, 200, 201]}]]
    run = {"config": {"ranks": 2, "physical_gpus": 1},
           "results": {"last_call_timeline_us": timeline(12), "one_sender_last_call_timeline_us": timeline(9)}}
    (tmp_path / "bench_ll_R2_E256.json").write_text(json.dumps(run))
    two_gpus = dict(run, config={"ranks": 2, "physical_gpus": 2})
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "bench_ll_R2_E256.json").write_text(json.dumps(two_gpus))
    ll_overlap.main([str(tmp_path), "--rounds", "one_sender"])
    out = capsys.readouterr().out
    assert "2 rank-rounds from 1 of 2 files" in out and "median 5.00 us (min 1.00, max 9.00)" in out
    ll_overlap.main([str(tmp_path)])
    assert "median 6.50 us (min 1.00, max 12.00)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ll_overlap.main([str(tmp_path), "--rounds", "hooked"])   # no such timeline in these runs


def test_low_latency_kernel_gaps(tmp_path, capsys):
    """ll_gaps.py: a kernel's end stamp to the next kernel's start, the combine receive's to the next round's dispatch
    send; per rank the median over rounds, then the max over ranks."""
    import ll_gaps

    def round_at(t0, recv_tail):   # kernels of 10 us; 2 us gaps after sends, 2 + recv_tail after the dispatch receive
        return {"dispatch_send": [t0, t0, t0, t0 + 10], "dispatch_recv": [t0 + 12, t0 + 12, t0 + 15, t0 + 22],
                "combine_send": [t0 + 24 + recv_tail, 0, 0, t0 + 34 + recv_tail],
                "combine_recv": [t0 + 36 + recv_tail, 0, 0, t0 + 46 + recv_tail]}
    rank0 = [round_at(0, 1), round_at(50, 1), round_at(100, 1)]   # combine receives end at 47 / 97: 3 us to the next
    rank1 = [round_at(0, 3), round_at(60, 3), round_at(120, 3)]   # ends at 49 / 109: 11 us to the next send
    gaps = ll_gaps.kernel_gaps([rank0, rank1])
    assert gaps == {"dispatch_send_end_to_recv": 2, "dispatch_recv_end_to_combine_send": 5,
                    "combine_send_end_to_recv": 2, "combine_recv_end_to_next_dispatch_send": 11}
    (tmp_path / "bench_ll_R2_E256.json").write_text(json.dumps({"results": {"last_call_timeline_us": [rank0, rank1]}}))
    ll_gaps.main([str(tmp_path)])
    assert "'combine_recv_end_to_next_dispatch_send': 11" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ll_gaps.main([str(tmp_path), "--rounds", "hooked"])   # no such timeline
