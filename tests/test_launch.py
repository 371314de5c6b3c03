"""CPU-side choices of the launcher and the runtime (no GPU needed)."""

import pytest

from jax_ep import launch


def test_mps_share_defaults_to_an_equal_split(monkeypatch):
    monkeypatch.delenv("JAX_EP_MPS_SM_PERCENT", raising=False)
    assert launch._sm_percent(8) == 12
    assert launch._sm_percent(3) == 33
    assert launch._sm_percent(200) == 1


def test_mps_share_override(monkeypatch):
    monkeypatch.setenv("JAX_EP_MPS_SM_PERCENT", "100")
    assert launch._sm_percent(8) == 100
    for bad in ("0", "101", "half", "-5"):
        monkeypatch.setenv("JAX_EP_MPS_SM_PERCENT", bad)
        with pytest.raises(ValueError, match="JAX_EP_MPS_SM_PERCENT"):
            launch._sm_percent(8)


def test_transport_choice(monkeypatch):
    """JAX_EP_TRANSPORT picks the communication memory: CUDA IPC by default, NVSHMEM on request, nothing else."""
    from jax_ep.cuda_backend import runtime
    monkeypatch.delenv("JAX_EP_TRANSPORT", raising=False)
    assert runtime.transport() == "ipc"
    monkeypatch.setenv("JAX_EP_TRANSPORT", "nvshmem")
    assert runtime.transport() == "nvshmem"
    monkeypatch.setenv("JAX_EP_TRANSPORT", "rdma")
    with pytest.raises(ValueError, match="JAX_EP_TRANSPORT"):
        runtime.transport()


def test_children_name_gpus_as_the_mps_server_numbers_them():
    """Under MPS the server renumbers its daemon's devices from 0: a child naming physical GPU 1 would see none."""
    assert launch._child_devices(["1"], 4, under_mps=True) == ("1", ["0", "0", "0", "0"])
    assert launch._child_devices(["2", "0"], 4, under_mps=True) == ("2,0", ["0", "1", "0", "1"])
    assert launch._child_devices(["2", "0"], 2, under_mps=False) == (None, ["2", "0"])
