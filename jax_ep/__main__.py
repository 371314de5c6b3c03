"""Command line: ``python -m jax_ep demo | train | info``.

On a machine without GPUs the CPU is split into 8 virtual devices (unless XLA_FLAGS says otherwise), so
the demo and the training example run a real 8-rank EP group anywhere.
"""

from __future__ import annotations

import os
import sys


def _virtual_cpu_devices(n: int = 8):
    # Must happen before jax is imported; it affects only the host platform, so GPUs are unaffected.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    _virtual_cpu_devices()
    if command == "demo":
        from .demo import main as run
    elif command == "train":
        from .train import main as run
    elif command == "info":
        from .demo import info as run
    else:
        print(f"usage: python -m jax_ep [demo|train|info] [options]  (unknown command {command!r})", file=sys.stderr)
        return 2
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
