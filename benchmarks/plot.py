"""Figures from benchmark results (matplotlib, Agg canvas: no display needed, the global backend untouched).

    python benchmarks/plot.py benchmarks/results/<run>.json [--out fig.png]      # a bench.py sweep
    python benchmarks/plot.py --h200-normal                                     # the recorded H200 run

A bench.py sweep gives one multi-panel PNG per (ranks, hidden, top-k, experts) slice of the sweep: rows =
GB/s vs tokens per rank, latency vs tokens, ratio to the measured ceiling, time relative to jax_ep; columns =
modes (normal, low-latency). Colours are implementations; line styles are the op (dispatch bf16 solid,
dispatch fp8 dashed, combine dotted). ``--h200-normal`` renders the recorded one-GPU normal-mode run
(``results/2026-11-29_h200_normal_sweep.json`` and ``_bench_R8.json``) as bars against the ceilings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
H200_SWEEP = os.path.join(RESULTS_DIR, "2026-11-29_h200_normal_sweep.json")
H200_BENCH = os.path.join(RESULTS_DIR, "2026-11-29_h200_normal_bench_R8.json")
H200_PNG = os.path.join(RESULTS_DIR, "2026-11-29_h200_normal.png")

COLORS = {"jax_ep": "#1f77b4", "jax_ep_reference": "#9467bd", "all_to_all_padded": "#ff7f0e",
          "ragged_all_to_all": "#2ca02c"}
STYLES = {("dispatch", "bf16"): "-", ("dispatch", "fp8"): "--", ("combine", "bf16"): ":"}
MARKERS = {"jax_ep": "o", "jax_ep_reference": "D", "all_to_all_padded": "s", "ragged_all_to_all": "^"}
MODE_TITLES = {"normal": "normal mode", "low_latency": "low-latency mode"}
SLICE_KEYS = ("ranks", "hidden", "topk", "experts")


def load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _ok(results: dict) -> list[dict]:
    return [p for p in results["points"] if p.get("status") == "ok"]


def slices(results: dict) -> list[tuple]:
    """The (ranks, hidden, topk, experts) combinations with measured points, most points first."""
    count = {}
    for p in _ok(results):
        k = tuple(p[key] for key in SLICE_KEYS)
        count[k] = count.get(k, 0) + 1
    return sorted(count, key=lambda k: (-count[k], k))


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _series(points, value):
    """{(impl, op, dtype): ([tokens], [values])} sorted by tokens."""
    out = {}
    for p in sorted(points, key=lambda p: p["tokens"]):
        v = value(p)
        if v is None:
            continue
        xs, ys = out.setdefault((p["impl"], p["op"], p["dtype"]), ([], []))
        xs.append(p["tokens"])
        ys.append(v)
    return out


def _line(ax, key, xs, ys, **kw):
    impl, op, dtype = key
    ax.plot(xs, ys, color=COLORS.get(impl, "gray"), linestyle=STYLES.get((op, dtype), "-."),
            marker=MARKERS.get(impl, "x"), markersize=4, label=f"{impl} {op} {dtype}", **kw)


def plot_sweep(results: dict, path: str, slice_: tuple | None = None) -> str:
    """One multi-panel PNG for one (ranks, hidden, topk, experts) slice (default: the largest)."""
    all_slices = slices(results)
    if not all_slices:
        raise ValueError("no measured points to plot")
    slice_ = tuple(slice_) if slice_ is not None else all_slices[0]
    pts = [p for p in _ok(results) if tuple(p[k] for k in SLICE_KEYS) == slice_]
    modes = [m for m in ("normal", "low_latency") if any(p["mode"] == m for p in pts)]
    rows = ["GB/s", "latency", "ratio", "speedup"]
    fig = Figure(figsize=(6.2 * len(modes), 3.3 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(modes), squeeze=False)
    R, H, K, E = slice_
    lim = results.get("limits", {})
    dev = results.get("devices", {})
    fig.suptitle(f"jax_ep on {dev.get('kind', '?')} ({dev.get('platform', '?')}): R={R} ranks, H={H}, top-{K} of "
                 f"{E} experts (B = {lim.get('hbm_copy_bytes_per_s', 0) / 1e9:.0f} GB/s copy)", fontsize=10)
    for col, mode in enumerate(modes):
        mp = [p for p in pts if p["mode"] == mode]
        # GB/s (kernel-side)
        ax = axes[0][col]
        for key, (xs, ys) in _series(mp, lambda p: p["GBps_op"]).items():
            _line(ax, key, xs, ys)
        ax.set_ylabel("GB/s (kernel-side)")
        ax.set_title(f"{MODE_TITLES.get(mode, mode)}: bandwidth (DeepEP bytes)", fontsize=9)
        # latency: kernel-side (markers) and through jit (faint)
        ax = axes[1][col]
        for key, (xs, ys) in _series(mp, lambda p: p["op_s"] * 1e6).items():
            _line(ax, key, xs, ys)
        for key, (xs, ys) in _series(mp, lambda p: p["jit_s"] * 1e6).items():
            ax.plot(xs, ys, color=COLORS.get(key[0], "gray"), linestyle=STYLES.get(key[1:], "-."), alpha=0.3)
        ax.set_ylabel("µs per op (faint: through jit)")
        ax.set_yscale("log")
        ax.set_title("latency", fontsize=9)
        # ratio to the ceiling
        ax = axes[2][col]
        for key, (xs, ys) in _series(mp, lambda p: p.get("ratio_op")).items():
            _line(ax, key, xs, ys)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.9, color="black", linewidth=0.6, linestyle="--")
        ax.set_ylabel("GB/s / ceiling")
        ax.set_title("ratio to the ceiling (dispatch B/4, combine B/3 per device; dashed: 0.9 target)",
                     fontsize=9)
        # implementation time / jax_ep time
        ax = axes[3][col]
        base = {(p["op"], p["dtype"], p["tokens"]): p["op_s"] for p in mp if p["impl"] == "jax_ep"}
        rel = _series([p for p in mp if p["impl"] != "jax_ep"],
                      lambda p: p["op_s"] / base[(p["op"], p["dtype"], p["tokens"])]
                      if (p["op"], p["dtype"], p["tokens"]) in base else None)
        for key, (xs, ys) in rel.items():
            _line(ax, key, xs, ys)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("time / jax_ep time")
        ax.set_title("baselines relative to jax_ep (> 1: jax_ep faster)", fontsize=9)
        for r in range(len(rows)):
            ax = axes[r][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per rank")
            ax.grid(True, which="both", alpha=0.3)
            if r in (0, len(rows) - 1) and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="best")
        if not rel:
            axes[3][col].clear()
            axes[3][col].set_axis_off()
            axes[3][col].text(0.5, 0.5, f"no baseline measured in {MODE_TITLES.get(mode, mode)}", ha="center",
                              va="center", transform=axes[3][col].transAxes)
    return _save(fig, path)


def plot_all(results: dict, path: str) -> list[str]:
    """plot_sweep for every slice: ``path`` for the first, ``<stem>_R{R}_H{H}_K{K}_E{E}.png`` for others."""
    out = []
    stem, ext = os.path.splitext(path)
    for i, s in enumerate(slices(results)):
        p = path if i == 0 else f"{stem}_R{s[0]}_H{s[1]}_K{s[2]}_E{s[3]}{ext or '.png'}"
        out.append(plot_sweep(results, p, s))
    return out


# -- the recorded H200 normal-mode run ----------------------------------------------------------------------

OPS = (("dispatch_bf16", "dispatch bf16"), ("dispatch_fp8", "dispatch fp8"), ("combine_bf16", "combine bf16"))


def plot_h200_normal(sweep_path: str = H200_SWEEP, bench_path: str = H200_BENCH, path: str = H200_PNG) -> str:
    """Bars: GB/s (kernel-side and through jit) of R=8 ranks under MPS and R=1 (whole GPU) on one H200,
    against the ceilings B/4 (dispatch) and B/3 (combine), B measured in the same run."""
    sweep, bench = load(sweep_path), load(bench_path)
    B = bench["hbm"]["hbm_copy_bytes_per_s"]
    r8 = sweep["r8_sweep"]["results_264_blocks"]
    r1 = sweep["r1_full_gpu"]["results"]
    cfg = sweep["r8_sweep"]["config"]
    bars = [("R=8, kernel-side", r8, "GBps_op", "#1f77b4", None),
            ("R=8, through jit", r8, "GBps_jit", "#aec7e8", None),
            ("R=1, kernel-side", r1, "GBps_op", "#ff7f0e", None),
            ("R=1, through jit", r1, "GBps_jit", "#ffbb78", None)]
    fig = Figure(figsize=(8.5, 4.6), layout="constrained")
    ax = fig.subplots()
    width = 0.19
    for g, (key, label) in enumerate(OPS):
        ceiling = (B / 3 if key.startswith("combine") else B / 4) / 1e9
        for b, (name, res, field, color, _) in enumerate(bars):
            v = res[key][field]
            xpos = g + (b - 1.5) * width
            ax.bar(xpos, v, width, color=color, label=name if g == 0 else None, edgecolor="black", linewidth=0.4)
            ax.text(xpos, v + 12, f"{v:.0f}\n{v / ceiling:.2f}", ha="center", va="bottom", fontsize=6.5)
        ax.hlines(ceiling, g - 2.2 * width, g + 2.2 * width, colors="black", linestyles="--", linewidth=1.2,
                  label="ceiling (B/4 dispatch, B/3 combine)" if g == 0 else None)
        ax.hlines(0.9 * ceiling, g - 2.2 * width, g + 2.2 * width, colors="gray", linestyles=":", linewidth=1.0,
                  label="target 0.9 x ceiling" if g == 0 else None)
        ax.text(g + 2.25 * width, ceiling, f"{ceiling:.0f}", va="center", fontsize=7)
    ax.set_xticks(range(len(OPS)), [label for _, label in OPS])
    ax.set_ylabel("GB/s (received bytes summed over ranks / time)")
    ax.set_ylim(0, B / 3 / 1e9 * 1.22)
    ax.set_title(f"jax_ep normal mode, one NVIDIA H200: T={cfg['tokens']} tokens/rank, H={cfg['hidden']}, "
                 f"top-{cfg['topk']} of {cfg['experts']}; B = {B / 1e12:.2f} TB/s copy (same run)\n"
                 "R=8: 8 processes under MPS; R=1: one process, same received bytes. "
                 "Bar labels: GB/s, ratio to ceiling", fontsize=8.5)
    ax.legend(fontsize=7, loc="upper left", ncols=2)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", help="a bench.py results JSON")
    p.add_argument("--out", default="", help="PNG path (default: the JSON's path with .png)")
    p.add_argument("--h200-normal", action="store_true",
                   help=f"render {os.path.relpath(H200_PNG)} from the recorded H200 run")
    args = p.parse_args(argv)
    if args.h200_normal:
        print(plot_h200_normal(path=args.out or H200_PNG))
        return 0
    if not args.results:
        p.error("give a results JSON or --h200-normal")
    for png in plot_all(load(args.results), args.out or os.path.splitext(args.results)[0] + ".png"):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
