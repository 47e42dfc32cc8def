"""One-time memory of the channel-group trace, in one process and under FSDP2 (two CPU ranks, gloo).

``GradualMagnitudePruning(granularity="channel")`` traces the model at its first mask update; under
FSDP2 the first rank does it on parameters gathered whole. Each variant runs in a fresh process
(two for FSDP2) on an MLP of 2048-wide Linears: after ``attach`` (with ``initial_sparsity`` at step
0, so the trace and first selection run in the first forward) the resident-set high-water mark is
reset (``/proc/self/clear_refs`` = 5) and the growth of ``VmHWM`` over that forward is reported,
for ``"channel"`` and, as the baseline, ``"unstructured"``. The difference is the trace's cost.

    PYTHONPATH=. python benchmarks/structured_fsdp2_memory.py              # 2 and 8 layers (32 / 128 MiB)
    PYTHONPATH=. python benchmarks/structured_fsdp2_memory.py --layers 2   # one size
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

WORKER = r"""
import os, sys, torch, torch.nn as nn
import torch.distributed as dist
from compress_callbacks import CompressionManager, GradualMagnitudePruning

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

granularity, layers, ranks, rank, store = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(2048, 2048), nn.ReLU())], nn.Linear(2048, 10))
if ranks > 1:
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
gmp = GradualMagnitudePruning(0.5, 0, 4, update_every=2, initial_sparsity=0.25, granularity=granularity,
                              exclude=[str(len(model) - 1)])
CompressionManager(gmp).attach(model, torch.optim.SGD(model.parameters(), lr=0.01))
x = torch.randn(8, 2048)
if ranks > 1:
    dist.barrier()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
with torch.no_grad():
    model(x)
print(f"{status('VmHWM') - before:.0f}")
if ranks > 1:
    dist.destroy_process_group()
"""


def growth(granularity: str, layers: int, ranks: int) -> list[float]:
    """Peak RSS growth (MiB) over the first forward, one figure per rank."""
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, granularity, str(layers), str(ranks), str(r), store],
                                  stdout=subprocess.PIPE, text=True, env=env) for r in range(ranks)]
        out = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed ({granularity}, {layers} layers, {ranks} ranks)")
    return [float(o.strip().splitlines()[-1]) for o in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="*", default=[2, 8])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print("| layers | params MiB | setup | rank | unstructured MiB | channel MiB | trace cost MiB |")
    print("|---|---|---|---|---|---|---|")
    for layers in args.layers:
        params = (layers * (2048 * 2048 + 2048) + 2048 * 10 + 10) * 4 / 2**20
        for ranks in (1, 2):
            runs = {g: [growth(g, layers, ranks) for _ in range(args.repeats)] for g in ("unstructured", "channel")}
            for rank in range(ranks):
                base = min(r[rank] for r in runs["unstructured"])
                chan = min(r[rank] for r in runs["channel"])
                setup = "one process" if ranks == 1 else "FSDP2, 2 ranks"
                print(f"| {layers} | {params:.0f} | {setup} | {rank} | {base:.0f} | {chan:.0f} | {chan - base:+.0f} |", flush=True)


if __name__ == "__main__":
    main()
