"""CPU-side choices of the launcher and the runtime (no GPU needed)."""

import pytest

from jax_ep import launch


def test_mps_share_defaults_to_an_equal_split_rounded_up(monkeypatch):
    monkeypatch.delenv("JAX_EP_MPS_SM_PERCENT", raising=False)
    assert launch._sm_percent(8) == 13
    assert launch._sm_percent(3) == 34
    assert launch._sm_percent(2) == 50
    assert launch._sm_percent(1) == 100
    assert launch._sm_percent(200) == 1


def test_mps_share_override(monkeypatch):
    monkeypatch.setenv("JAX_EP_MPS_SM_PERCENT", "100")
    assert launch._sm_percent(8) == 100
    for bad in ("0", "101", "half", "-5"):
        monkeypatch.setenv("JAX_EP_MPS_SM_PERCENT", bad)
        with pytest.raises(ValueError, match="JAX_EP_MPS_SM_PERCENT"):
            launch._sm_percent(8)


def test_transport_choice(monkeypatch):
    """JAX_EP_TRANSPORT picks the communication memory: auto by default, IPC or NVSHMEM on request, nothing else."""
    from jax_ep.cuda_backend import runtime
    monkeypatch.delenv("JAX_EP_TRANSPORT", raising=False)
    assert runtime.transport() == "auto"
    monkeypatch.setenv("JAX_EP_TRANSPORT", "nvshmem")
    assert runtime.transport() == "nvshmem"
    monkeypatch.setenv("JAX_EP_TRANSPORT", "ipc")
    assert runtime.transport() == "ipc"
    monkeypatch.setenv("JAX_EP_TRANSPORT", "rdma")
    with pytest.raises(ValueError, match="JAX_EP_TRANSPORT"):
        runtime.transport()


def test_children_name_gpus_as_the_mps_server_numbers_them():
    """Under MPS the server renumbers its daemon's devices from 0: a child naming physical GPU 1 would see none."""
    assert launch._child_devices(["1"], 4, under_mps=True) == ("1", ["0", "0", "0", "0"])
    assert launch._child_devices(["2", "0"], 4, under_mps=True) == ("2,0", ["0", "1", "0", "1"])
    assert launch._child_devices(["2", "0"], 2, under_mps=False) == (None, ["2", "0"])


def test_auto_transport_takes_nvshmem_only_where_every_process_can():
    """auto: NVSHMEM when several processes each drive one GPU of the mesh, the mesh spans every process and
    the Buffer fits what is left of the symmetric heap; otherwise CUDA IPC / in-process peers."""
    from jax_ep.cuda_backend.runtime import _HEAP_SLACK, use_symmetric
    gib = 1 << 30
    launcher = dict(devices_per_process=[1] * 8, processes_in_mesh=8, process_count=8, nbytes=gib)
    assert use_symmetric("auto", 1, **launcher, heap_free=None)               # first Buffer sizes the heap
    assert use_symmetric("auto", 1, **launcher, heap_free=gib + _HEAP_SLACK)
    assert not use_symmetric("auto", 1, **launcher, heap_free=gib)            # would not fit: IPC instead
    assert not use_symmetric("ipc", 1, **launcher, heap_free=None)
    one_process = dict(devices_per_process=[2], processes_in_mesh=1, process_count=1, nbytes=gib, heap_free=None)
    assert not use_symmetric("auto", 1, **one_process)                        # in-process peers
    mixed = dict(devices_per_process=[2, 1], processes_in_mesh=2, process_count=2, nbytes=gib, heap_free=None)
    assert not use_symmetric("auto", 1, **mixed)
    part = dict(devices_per_process=[1, 1], processes_in_mesh=2, process_count=4, nbytes=gib, heap_free=None)
    assert not use_symmetric("auto", 1, **part)                               # the heap is collective over all
    assert use_symmetric("nvshmem", 1, **mixed)                               # asked for: the runtime explains why not
    assert use_symmetric("ipc", 2, **launcher, heap_free=None)                # internode mode always is symmetric


def test_same_gpu_mask_names_the_ranks_sharing_this_rank_gpu():
    """The low-latency dispatch reads the rows of ranks on its own GPU from their staging and writes into the others':
    the mask has bit r for every rank whose device UUID is this rank's (its own bit included)."""
    from jax_ep.cuda_backend.runtime import same_gpu_mask
    one_gpu = [b"A" * 16] * 8                                  # R=8 processes under MPS on one GPU
    assert same_gpu_mask(one_gpu, 3) == 0xFF
    per_gpu = [bytes([i]) * 16 for i in range(8)]              # one rank per GPU
    assert [same_gpu_mask(per_gpu, r) for r in range(8)] == [1 << r for r in range(8)]
    two_by_two = [b"A" * 16, b"A" * 16, b"B" * 16, b"B" * 16]  # R=4 over two GPUs
    assert same_gpu_mask(two_by_two, 1) == 0b0011 and same_gpu_mask(two_by_two, 2) == 0b1100
    assert same_gpu_mask([b"A" * 16] * 64, 63) == (1 << 64) - 1  # the widest group: the kernels' 64-bit mask


def test_coordinator_port_is_outside_the_ephemeral_range_and_free():
    """The launcher's coordinator port: never one the kernel may hand to an outgoing connection meanwhile,
    and bindable on every address (what JAX's coordinator binds)."""
    import socket
    lo, hi = launch._ephemeral_ports()
    for _ in range(20):
        port = launch._free_port()
        assert launch._bindable(port)
        if lo > launch._LOWEST_PORT + 1000:
            assert launch._LOWEST_PORT <= port < lo
    with socket.socket() as s:   # a port somebody listens on is never offered
        s.bind(("0.0.0.0", port))
        s.listen()
        assert not launch._bindable(port)


def test_low_latency_ranks_sharing_a_gpu_are_warned_of_overlapping_mps_shares():
    """Several low-latency ranks on one GPU at shares that stalled the low-latency ops until the timeout (a rank at
    100 %; more than two ranks whose shares add up to more than the GPU) are warned of. jax_ep.launch's default
    shares, and two ranks below 100 % (measured at 55 % and 99 %), are not."""
    from jax_ep.cuda_backend.runtime import mps_share_warning
    assert mps_share_warning(1, None) is None                       # one rank per GPU: no sharing
    for n in range(2, 65):
        assert mps_share_warning(n, str(launch.default_sm_percent(n))) is None
    unset = mps_share_warning(2, None)
    assert unset and "unset" in unset and "at 100 %" in unset and "at most 50 %" in unset
    assert mps_share_warning(2, " ") == unset                        # empty counts as unset
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100" in mps_share_warning(8, "100")
    assert mps_share_warning(2, "55") is None and mps_share_warning(2, "99") is None
    assert mps_share_warning(2, "100")                               # one rank at 100 % is enough
    assert mps_share_warning(3, "34") is None and mps_share_warning(3, "35")
    assert "at most 13 %" in mps_share_warning(8, "99") and mps_share_warning(8, "14")
    assert mps_share_warning(2, "not a number") is None
