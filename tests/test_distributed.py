"""A LieRA-injected model under DDP / FSDP2 (gloo, 2 CPU processes) gets one process's grads."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lie_kernels as lk

WORLD = 2


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=3),
                      nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    lk.inject(m, rank=2, order=2)
    with torch.no_grad():  # move off the zero init so every factor gets a gradient
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return m


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4 * WORLD, 2, 6, 6, generator=g), torch.randint(0, 3, (4 * WORLD,),
                                                                       generator=g)


def _grads(wrapped, model, x, y):
    nn.functional.cross_entropy(wrapped(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, store, kind, out):
    # a file store: no TCP store server thread in rank 0, no free-port race
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if kind == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for m in model:  # LieLayers shard their factors; frozen W rides along
                if isinstance(m, lk.nn.LieLayer):
                    fully_shard(m)
            wrapped = fully_shard(model)
        x, y = _batch()
        grads = _grads(wrapped, model, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
        if kind == "fsdp2":  # DTensor shards -> full tensors
            grads = {n: g.full_tensor() for n, g in grads.items()}
        if rank == 0:
            torch.save(grads, out)
        # Tear down together: gloo aborts a rank (SIGABRT, "terminate called without an
        # active exception", seen once in CI) whose peer closes its sockets mid-teardown.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch built without torch.distributed/gloo")
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_processes_match_one(kind, tmp_path):
    out = str(tmp_path / "grads.pt")
    # spawn (not fork): a clean interpreter per rank, as torchrun gives
    mp.start_processes(_worker, args=(str(tmp_path / "store"), kind, out), nprocs=WORLD,
                       start_method="spawn")
    got = torch.load(out)
    model = _model()
    want = _grads(model, model, *_batch())
    assert got.keys() == want.keys() and any(k.endswith("lie_core") for k in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
