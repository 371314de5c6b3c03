"""The README's usage example runs as written (8 virtual CPU devices, reference backend)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_usage_example_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Usage\s+```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    y = scope["y"]
    assert y.shape == scope["x"].shape
    assert bool(scope["jnp"].all(scope["jnp"].isfinite(y)))


def test_demo_main_job_matches_dense_moe(capsys):
    """The README's main job (``python -m jax_ep demo``): the training/prefill step and the decode step both
    match the dense MoE (the demo exits non-zero otherwise)."""
    from jax_ep import demo
    result = demo.main(["--tokens", "32", "--iters", "1", "--decode-tokens", "8"])
    assert result["ranks"] == 8
    assert result["error"] < 1e-4 and result["decode_error"] < 2e-2
    out = capsys.readouterr().out
    assert "check vs dense MoE" in out and "decode step (low-latency mode" in out
