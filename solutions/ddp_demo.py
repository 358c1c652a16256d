"""Chapter 5: DistributedDataParallel on the chapter's small Llama, one process per device.

Launched by torchrun, for example as two CPU processes on the gloo backend::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 -m solutions.ddp_demo OUT_DIR

Every process builds the same model and the same batch and keeps its own contiguous share of
the rows. Rank 0 writes the gradients of two losses after DDP has averaged them over the
processes, and the time of a training step:

- ``naive``: each process's mean over its own answer tokens (the usual loss);
- ``token_weighted``: each process's sum over its tokens divided by the number of tokens of the
  whole batch (counted with an all-reduce), times the number of processes, which DDP's average
  divides out again. This one equals the gradient of one process on the whole batch.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist


def build(hidden: int, n_layers: int, batch: int, seed: int = 0):
    """The model and the batch every process (and the single-process reference) starts from."""
    from . import lora

    lora.quiet_libraries()
    tokenizer = lora.CharTokenizer()
    model = lora.new_tiny_llama(tokenizer, hidden_size=hidden, n_layers=n_layers, n_heads=4,
                                intermediate_size=4 * hidden, seed=seed)
    task = lora.ArithmeticTask("add")
    pairs = random.Random(seed).sample(task.split()[0], batch)
    x, y = lora.make_batch(tokenizer, task, pairs)
    return model, x, y


def shard(x: torch.Tensor, y: torch.Tensor, rank: int, world: int):
    """This process's contiguous share of the rows (sizes differ by at most one)."""
    rows = torch.arange(len(x)).tensor_split(world)[rank]
    return x[rows], y[rows]


def answer_tokens(y: torch.Tensor) -> int:
    return int((y[:, 1:] != -100).sum())


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters() if p.grad is not None}


def main(argv=None) -> None:
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    from . import lora

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="training steps to time")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)                    # one core per process: several processes share the machine
    model, x, y = build(args.hidden, args.layers, args.batch)
    ddp = DistributedDataParallel(model)        # broadcasts rank 0's weights; averages gradients in backward
    xs, ys = shard(x, y, rank, world)

    lora.lm_loss(ddp, xs, ys).backward()        # naive: the mean over this process's tokens
    naive = _grads(model)
    ddp.zero_grad(set_to_none=True)

    n_local = torch.tensor(answer_tokens(ys))
    n_global = n_local.clone()
    dist.all_reduce(n_global)                   # the answer tokens of the whole batch

    def weighted_loss():
        return lora.lm_loss(ddp, xs, ys) * n_local / n_global * world

    weighted_loss().backward()
    weighted = _grads(model)

    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    times = []
    for _ in range(args.steps + 2):
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        weighted_loss().backward()
        opt.step()
        dist.barrier()
        times.append((time.perf_counter() - start) * 1000)
    tokens = [torch.zeros((), dtype=n_local.dtype) for _ in range(world)]
    dist.all_gather(tokens, n_local)
    if rank == 0:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        save_file(naive, args.out_dir / "grads_naive.safetensors")
        save_file(weighted, args.out_dir / "grads_token_weighted.safetensors")
        info = {"world_size": world, "backend": dist.get_backend(), "rows": [len(r) for r in
                torch.arange(len(x)).tensor_split(world)], "answer_tokens": [int(t) for t in tokens],
                "step_ms": sorted(times[2:])[len(times[2:]) // 2], "threads_per_process": torch.get_num_threads()}
        (args.out_dir / "ddp_result.json").write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
