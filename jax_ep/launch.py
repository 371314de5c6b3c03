"""Start R cooperating processes on this machine's GPUs: ``python -m jax_ep.launch --nproc R -- cmd ...``.

Process i gets GPU i % G (G = visible GPUs). When R > G, several processes share a GPU: the launcher
starts the CUDA MPS daemon (and stops it afterwards), and caps each process at an equal share of the SMs
(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, default_sm_percent) so that the ranks spinning on a GPU leave their peers room to
run. The share is a cap, not a partition: MPS (driver 580) ran the clients on the same first SMs (R=2 at 50 %: both
ranks on SMs 0-65 of the H200's 132; at 99 %: both on SMs 0-129; R=8 at 13 %: all on SMs 0-15), measured with %smid
on 2026-11-30. JAX_EP_MPS_SM_PERCENT=100 lets every rank use every SM: safe for normal-mode jobs (their kernels wait
in one-block kernels) and measured 21 % faster at R=8. Jobs that use low-latency mode, whose receive kernels spin in
every block, need care: with a rank at 100 % an R=2 low-latency benchmark stalled until the device-side timeout in 5
runs of 5, and 8 ranks at 25 % or 99 % each stalled (2026-11-30); two ranks at 99 % each did not (see
default_sm_percent for what that share gains and costs); a low-latency Buffer warns of such shares. Each
child calls ``jax_ep.launch.initialize()`` (or ``jax.distributed.initialize`` itself) with the environment set
here: JAX_EP_COORDINATOR, JAX_EP_NUM_PROCESSES, JAX_EP_PROCESS_ID.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

_LOWEST_PORT = 10000   # coordinator ports are drawn from [_LOWEST_PORT, start of the ephemeral range)
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def initialize():
    """Call in each child: joins the process group the launcher set up (one local GPU per process)."""
    import jax
    jax.distributed.initialize(coordinator_address=os.environ["JAX_EP_COORDINATOR"],
                               num_processes=int(os.environ["JAX_EP_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_EP_PROCESS_ID"]), local_device_ids=[0])


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def default_sm_percent(ranks_per_gpu: int) -> int:
    """The SM share jax_ep.launch gives each of ``ranks_per_gpu`` ranks on one GPU when JAX_EP_MPS_SM_PERCENT is unset:
    an equal split, rounded up.

    Rounded up because MPS rounds a share down to whole TPCs (pairs of SMs): 100 // 8 = 12 % gave each of 8 ranks 14
    of the H200's 132 SMs and 13 % gives 16. Every rank gets the same 16 (SMs 0-15): MPS caps each client at its share
    of the first SMs, it does not hand out disjoint ones. Measured at R=8 (low-latency benchmark, dispatch / combine,
    with the grids of cuda/low_latency.cu's five_per_sm_grid): 12 % -> 13 %, 84.1-84.3 / 104.1-104.9 us -> 76.5-77.0 /
    100.5-101.2 us.

    Two ranks at 99 % each (JAX_EP_MPS_SM_PERCENT=99) run on SMs 0-129 instead of 0-65. Measured on an H200 (driver
    580.159.04, 2026-11-30, 7 runs each; docs/low_latency.md, "Twenty-third session"): the low-latency benchmark's
    combine send 9.76-10.27 -> 8.74-9.68 us, but with a GEMM between each send and its receive (DeepEP's hooked
    timing) dispatch / combine 22.9-23.3 / 24.1-24.6 -> 29.8-32.1 / 34.9-36.3 us (why was not measured). Shares in
    between did no better (twenty-fourth session, 3 runs each): the combine send 9.87-10.64 us at 50 %, 10.91-11.20 at
    65 %, 10.34-10.53 at 75 %, 10.14-10.56 at 85 % (there with hooked combines of 33.5-34.0 us). So the equal split
    stays the default.
    """
    return max(1, -(-100 // ranks_per_gpu))


def _sm_percent(ranks_per_gpu: int) -> int:
    """Each rank's SM share under MPS: default_sm_percent unless JAX_EP_MPS_SM_PERCENT (1..100) says otherwise."""
    given = os.environ.get("JAX_EP_MPS_SM_PERCENT", "").strip()
    if not given:
        return default_sm_percent(ranks_per_gpu)
    if not given.isdigit() or not 1 <= int(given) <= 100:
        raise ValueError(f"JAX_EP_MPS_SM_PERCENT={given!r}: want an integer percentage in 1..100")
    return int(given)


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel hands out to outgoing connections (Linux; its default elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(v) for v in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    """Whether a listener can bind ``port`` on every address now, as JAX's coordinator does ([::], 0.0.0.0)."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address, port))
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # no IPv6 on this host
            return False
    return True


def _free_port() -> int:
    """A port for the coordinator, below the ephemeral range: a port the kernel picks (bind to port 0) is free
    only until the coordinator binds it, and an outgoing connection of another process took one in that window
    once (a GPU-suite launch failed with "Address already in use"). Outgoing connections never get ports
    below the range; a listener there is caught by the probe."""
    lo, _ = _ephemeral_ports()
    if lo > _LOWEST_PORT + 1000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(_LOWEST_PORT, lo)
            if _bindable(port):
                return port
    with socket.socket() as s:  # unusual port ranges: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_devices(gpus: list[str], nproc: int, under_mps: bool) -> tuple[str | None, list[str]]:
    """(the MPS daemon's CUDA_VISIBLE_DEVICES, each child's CUDA_VISIBLE_DEVICES).

    The MPS server renumbers the devices its daemon sees from 0, and a client naming the physical index
    (say "1" when the daemon was started with CUDA_VISIBLE_DEVICES=1) gets no device at all; so under MPS the
    daemon is given the chosen GPUs and each child its position among them.
    """
    if under_mps:
        return ",".join(gpus), [str(i % len(gpus)) for i in range(nproc)]
    return None, [gpus[i % len(gpus)] for i in range(nproc)]


class _Mps:
    """The MPS control daemon, private to this launch (own pipe/log directories), over the given GPUs."""

    def __init__(self, visible_devices: str):
        self.dir = tempfile.mkdtemp(prefix="jax_ep_mps_")
        self.env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=os.path.join(self.dir, "pipe"),
                        CUDA_MPS_LOG_DIRECTORY=os.path.join(self.dir, "log"), CUDA_VISIBLE_DEVICES=visible_devices)
        os.makedirs(self.env["CUDA_MPS_PIPE_DIRECTORY"])
        os.makedirs(self.env["CUDA_MPS_LOG_DIRECTORY"])
        if shutil.which("nvidia-cuda-mps-control") is None:
            raise RuntimeError("jax_ep.launch: more processes than GPUs needs CUDA MPS (nvidia-cuda-mps-control)")
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=self.env, check=True, timeout=60)

    def stop(self):
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=self.env, timeout=60)
        time.sleep(0.5)
        shutil.rmtree(self.dir, ignore_errors=True)


def launch(nproc: int, command: list[str], timeout: float | None = None, gpus: list[str] | None = None) -> int:
    """Run ``command`` as ``nproc`` processes; returns the first non-zero exit code (0 if all succeed)."""
    gpus = gpus if gpus is not None else _visible_gpus()
    if not gpus:
        raise RuntimeError("jax_ep.launch: no GPU visible")
    per_gpu = -(-nproc // len(gpus))
    daemon_devices, child_devices = _child_devices(gpus, nproc, under_mps=per_gpu > 1)
    mps = _Mps(daemon_devices) if daemon_devices is not None else None
    base = dict(mps.env if mps else os.environ, **SAFE_ENV)
    base.update(JAX_EP_COORDINATOR=f"127.0.0.1:{_free_port()}", JAX_EP_NUM_PROCESSES=str(nproc))
    if per_gpu > 1:
        base["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(_sm_percent(per_gpu))
    procs = []
    try:
        for i in range(nproc):
            env = dict(base, JAX_EP_PROCESS_ID=str(i), CUDA_VISIBLE_DEVICES=child_devices[i])
            procs.append(subprocess.Popen(command, env=env, start_new_session=True))
        deadline = None if timeout is None else time.monotonic() + timeout
        code = 0
        pending = list(procs)
        while pending:
            for p in list(pending):
                rc = p.poll()
                if rc is not None:
                    pending.remove(p)
                    if rc and not code:
                        code = rc
                        _stop(pending)  # one rank failed: the others would wait for it
            if deadline is not None and time.monotonic() > deadline:
                _stop(pending)
                return code or 124
            time.sleep(0.05)
        return code
    finally:
        _stop(procs)
        if mps:
            mps.stop()


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jax_ep.launch", description=__doc__)
    p.add_argument("--nproc", type=int, required=True, help="processes (ranks) to start")
    p.add_argument("--timeout", type=float, default=None, help="kill everything after this many seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- program and its arguments")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("missing command")
    return launch(args.nproc, command, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
