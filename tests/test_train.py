"""The training example (jax_ep.train) learns: a tiny MoE LM on the dp x ep CPU mesh, 30 steps."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("optax")

import jax  # noqa: E402

from jax_ep import train  # noqa: E402


def test_corpus_is_deterministic():
    assert train.make_corpus(5000, seed=3) == train.make_corpus(5000, seed=3)
    data = train.CharData(train.make_corpus(5000))
    batch = data.batch(4, 16)
    assert batch.shape == (4, 17) and batch.max() < len(data.vocab)


def test_train_loss_decreases():
    n = len(jax.devices())
    # a dp x ep mesh with dp > 1 where the device count allows (8 CPU devices: dp=2, ep=4)
    ep = max(d for d in range(1, n + 1) if n % d == 0 and 8 % d == 0 and (d < n or n == 1))
    result = train.main(["--steps", "30", "--batch", str(n * max(1, 8 // n)), "--seq", "32", "--layers", "1",
                         "--hidden", "32", "--experts", "8", "--topk", "2", "--lr", "1e-2", "--log-every", "10",
                         "--ep", str(ep), "--router", "deepseek_v3", "--n-group", "4", "--topk-group", "2",
                         "--shared-experts", "1"])
    vocab = len(train.CharData(train.make_corpus()).vocab)
    assert len(result["losses"]) == 30
    assert all(math.isfinite(v) for v in result["losses"])
    # from above a uniform guess (log V ~ 3.3 nats) to well below it
    assert result["final_loss"] < 0.8 * result["initial_loss"]
    assert result["final_loss"] < math.log(vocab) - 0.4
    assert result["tokens_per_s"] > 0 and 0 < result["comm_share"]
    assert result["config"]["steps"] == 30


def test_defaults():
    args = train.parse_args([])
    assert args.steps == 200 and args.dp == 0 and args.ep == 0
