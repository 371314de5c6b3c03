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
