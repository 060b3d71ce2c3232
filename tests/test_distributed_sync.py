"""Parameters outside DDP (the official LCR's gamma) get gradients averaged over ranks."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.distributed import Runtime, sync_gradients_of


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gamma = torch.nn.Parameter(torch.ones(3))
        sync_gradients_of([gamma], Runtime(torch.device("cpu"), [], rank, world, True))
        # every rank sees different data: d/dgamma of sum((rank + 1) * gamma) is rank + 1
        ((rank + 1) * gamma).sum().backward()
        out[rank] = gamma.grad.clone()
    finally:
        dist.destroy_process_group()


def test_gradients_are_averaged_over_ranks():
    world = 2
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    expected = torch.full((3,), (1 + 2) / 2)
    assert torch.equal(out[0], expected) and torch.equal(out[1], expected)


def test_no_hook_without_ddp():
    gamma = torch.nn.Parameter(torch.ones(2))
    sync_gradients_of([gamma], Runtime(torch.device("cpu"), []))
    (3 * gamma).sum().backward()
    assert torch.equal(gamma.grad, torch.full((2,), 3.0))
