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
