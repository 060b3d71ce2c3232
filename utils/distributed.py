"""Device and process set-up: torchrun (DDP), DataParallel over ``--gpus``, or CPU.

- Launched by ``torchrun`` (``WORLD_SIZE`` in the environment): one process per device,
  ``init_process_group`` from env://, NCCL on GPU and gloo on CPU.
- Otherwise ``--gpus 0,1,3`` picks GPUs for one process (DataParallel over more than one).
- No GPU on the machine: CPU with one notice line, whatever ``--gpus`` says.

The training scripts and every tool pick their device here (:func:`setup_runtime`).
"""
import dataclasses
import os

import torch
import torch.distributed as dist
import torch.nn as nn


class DeviceError(Exception):
    """``--gpus`` names a GPU that this machine does not have."""


@dataclasses.dataclass
class Runtime:
    device: torch.device
    gpus: list
    rank: int = 0
    world_size: int = 1
    distributed: bool = False
    notice: str = ""
    threads: int = 0

    @property
    def is_main(self):
        """True in the process that writes files and prints (rank 0)."""
        return self.rank == 0


def parse_gpus(text):
    """``"0,1,3"`` -> [0, 1, 3]; ``"cpu"``, ``"-1"`` or empty -> []."""
    text = str(text).strip().lower()
    if text in ("", "cpu", "none", "-1"):
        return []
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise DeviceError(f"--gpus takes GPU ids such as 0 or 0,1,3 (or cpu), got {text!r}") from None


def setup_runtime(gpus_flag, threads=0, allow_distributed=True):
    """Pick the device(s), start the process group under torchrun, and set torch's CPU threads.

    ``threads`` > 0 sets that many; 0 means one thread when the run is on the CPU (on a busy 2-core
    machine torch's default of 2 ran the quick start about 9x slower, README "Threads") and torch's
    own choice otherwise. The count used is ``runtime.threads``.
    """
    runtime = _pick_devices(gpus_flag, allow_distributed)
    if threads > 0 or runtime.device.type == "cpu":
        torch.set_num_threads(threads or 1)
    runtime.threads = torch.get_num_threads()
    return runtime


def _pick_devices(gpus_flag, allow_distributed):
    if allow_distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _setup_distributed()
    gpus = parse_gpus(gpus_flag)
    if not gpus:
        return Runtime(torch.device("cpu"), [])
    if not torch.cuda.is_available():
        return Runtime(torch.device("cpu"), [],
                       notice=f"no GPU found: running on CPU (ignoring --gpus {gpus_flag})")
    count = torch.cuda.device_count()
    bad = [g for g in gpus if not 0 <= g < count]
    if bad:
        raise DeviceError(f"--gpus names GPU {bad[0]} but this machine has {count} "
                          f"(ids 0..{count - 1}); pass e.g. --gpus 0")
    torch.cuda.set_device(gpus[0])
    return Runtime(torch.device("cuda", gpus[0]), gpus)


def _setup_distributed():
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs; "
                              f"start torchrun with --nproc_per_node <= {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return Runtime(device, [device.index] if device.type == "cuda" else [], rank, world, True)


def wrap_model(model, runtime):
    """DDP under torchrun, DataParallel over several --gpus, the bare model otherwise."""
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if len(runtime.gpus) > 1:
        return nn.DataParallel(model, device_ids=runtime.gpus)
    return model


def all_reduce_sum(values, runtime):
    """Sum a list of floats over all processes (identity without DDP)."""
    if not runtime.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return t.tolist()


def sync_gradients_of(params, runtime):
    """Average the gradients of parameters that DDP does not own (e.g. the official LCR's gamma)."""
    if not runtime.distributed:
        return

    def average(grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / runtime.world_size
    for p in params:
        p.register_hook(average)


def cleanup(runtime):
    """Tear down the process group, if any."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
