"""Byte model of hierarchical (network + NVLink) dispatch / combine, DeepEP's internode design.

For a topology (nodes x GPUs per node) and DeepSeek-V3 group-limited routing (sigmoid scores, experts in
``n_group`` contiguous groups, each token picks its top-k inside its best ``topk_group`` groups), routings are
simulated with ``jax_ep.flax.router`` and counted:

- network ("RDMA") bytes per GPU: each token crosses the network at most once per destination node (to the
  GPU with the same local index), i.e. distinct *remote* nodes per token x row bytes;
- NVLink ("NVL") bytes per GPU: every received row reaches its GPU over NVLink once (from the forwarder of
  its node, or from the source inside the source's node); by symmetry a GPU receives as many rows as its
  own tokens produce (distinct destination GPUs per token), DeepEP's "NVL" count;

and the time the kernels would need if they ran at the links' rates: max(network bytes / NIC rate, NVLink
bytes / NVLink rate), plus the predicted bandwidth in DeepEP's conventions. Numbers to aim the internode
kernels at (issue 8), not a measurement.

    python benchmarks/internode_model.py --nodes 2 4 8 --nic-gbps 400
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def simulate(nodes, gpus_per_node, tokens, hidden, topk, experts, n_group, topk_group, fp8=True, seed=0):
    import jax
    import jax.numpy as jnp
    from jax_ep.flax.router import RouterConfig, route

    cfg = RouterConfig(kind="deepseek_v3", num_experts=experts, topk=topk, n_group=n_group, topk_group=topk_group)
    logits = jax.random.normal(jax.random.key(seed), (tokens, experts), jnp.float32)
    idx = np.asarray(route(cfg, logits)[0])                           # [T, K] global expert ids
    R = nodes * gpus_per_node
    experts_per_gpu = experts // R
    dest_gpu = idx // experts_per_gpu                                 # [T, K]
    src_gpu = 0                                                       # by symmetry: the first GPU of node 0
    src_node = src_gpu // gpus_per_node
    gpus = np.zeros((tokens, R), bool)
    gpus[np.arange(tokens)[:, None], dest_gpu] = True
    node_hit = gpus.reshape(tokens, nodes, gpus_per_node).any(-1)     # [T, nodes]
    remote_nodes = node_hit.sum(1) - node_hit[:, src_node]
    row = hidden + hidden // 128 * 4 if fp8 else 2 * hidden
    network = int(remote_nodes.sum()) * row
    recv_rows = nvl_rows = int(gpus.sum())
    return dict(network_bytes=network, nvl_bytes=nvl_rows * row, recv_rows=recv_rows, row_bytes=row,
                avg_remote_nodes=float(remote_nodes.mean()), avg_dest_gpus=float(gpus.sum(1).mean()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--n-group", type=int, default=8)
    p.add_argument("--topk-group", type=int, default=4)
    p.add_argument("--nic-gbps", type=float, default=400.0, help="per-GPU NIC line rate, Gbit/s")
    p.add_argument("--nic-efficiency", type=float, default=0.9, help="fraction of line rate the kernels reach")
    p.add_argument("--nvlink-GBps", type=float, default=360.0, help="per-GPU NVLink rate a copy kernel reaches, GB/s")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    nic = args.nic_gbps / 8 * 1e9 * args.nic_efficiency
    nvl = args.nvlink_GBps * 1e9
    rows = []
    for n in args.nodes:
        for op, fp8 in (("dispatch fp8", True), ("combine bf16", False)):
            m = simulate(n, args.gpus_per_node, args.tokens, args.hidden, args.topk, args.experts, args.n_group,
                         args.topk_group, fp8=fp8)
            t_net, t_nvl = m["network_bytes"] / nic, m["nvl_bytes"] / nvl
            t = max(t_net, t_nvl)
            rows.append(dict(nodes=n, op=op, **m, t_network_us=t_net * 1e6, t_nvlink_us=t_nvl * 1e6,
                             predicted_us=t * 1e6, bound="network" if t_net >= t_nvl else "nvlink",
                             rdma_GBps=m["network_bytes"] / t / 1e9, nvl_GBps=m["nvl_bytes"] / t / 1e9))
    print(f"{'nodes':>5} {'op':<13} {'remote nodes/token':>18} {'RDMA MB':>8} {'NVL MB':>8} {'pred us':>8} "
          f"{'bound':>8} {'RDMA GB/s':>9} {'NVL GB/s':>9}")
    for r in rows:
        print(f"{r['nodes']:>5} {r['op']:<13} {r['avg_remote_nodes']:>18.2f} {r['network_bytes'] / 1e6:>8.1f} "
              f"{r['nvl_bytes'] / 1e6:>8.1f} {r['predicted_us']:>8.0f} {r['bound']:>8} {r['rdma_GBps']:>9.1f} "
              f"{r['nvl_GBps']:>9.1f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(config=vars(args), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
