"""Distributed calibration: every rank observes its own shard, qswap reduces the observers.

    torchrun --nproc-per-node 2 examples/distributed_calibrate.py   # gloo on CPU, nccl on GPUs
    python examples/distributed_calibrate.py                        # one process

Every rank holds the same float model (here the forum's Cifar_VGG, trained for a few seconds
on rank 0 and broadcast; in practice every rank loads the same checkpoint), calibrates on its
shard of the calibration batches and converts. ``qswap.calibrate`` sees that
``torch.distributed`` is initialized and reduces every observer across the ranks before any
quantization parameter is computed, so all ranks end with the same parameters: bit for bit
those of one process that saw every batch, which rank 0 checks by observing them all itself.
(torchrun runs each rank with OMP_NUM_THREADS=1; run the single process that way too and
its digest equals the ranks': training, hence the weights, depend on the thread count.)
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time

import torch
import torch.distributed as dist
from forum_models import accuracy, load_digits_dataset, train, vgg
from torch import nn

import qswap

QUICK = os.environ.get("QSWAP_EXAMPLE_QUICK") == "1"  # the test suite runs a shorter version


def digest(qmodel: nn.Module) -> str:
    """A short fingerprint of every scale and zero point of a converted model."""
    h = hashlib.sha256()
    for name, layer in sorted(qmodel._qswap.layers.items()):
        for slot, qp in sorted(layer.qparams.items()):
            h.update(f"{name}/{slot}".encode())
            h.update(qp.scale.cpu().numpy().tobytes())
            h.update(qp.zero_point.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if world > 1:  # started by torchrun: RANK, WORLD_SIZE, MASTER_ADDR, ... are set
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        # A rank that dies or stalls makes the others fail after this timeout, not hang.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=2))
    rank = dist.get_rank() if world > 1 else 0

    data = load_digits_dataset(seed=0)
    torch.manual_seed(0)
    model = vgg(width=0.25)
    if rank == 0:
        train(model, data, epochs=2 if QUICK else 4)
    model = model.eval().to(device)
    if world > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)

    # The same calibration set on every rank, each rank taking every world-th batch of it.
    images = data.x_train[: 256 if QUICK else 1024].to(device)
    batches = list(images.split(32))
    shard = batches[rank::world]
    # Real int8 on CPU, fake-quant on GPUs. Min-max observers reduce exactly (bit for bit);
    # the x86 preset's histogram observers would agree within one histogram bin.
    preset = "x86_int8" if device.type == "cpu" else "w8a8_minmax"
    config = {"version": 1, "extends": [preset], "activation": {"observer": "minmax"}}
    example = (data.x_test[:1].to(device),)

    prepared = qswap.prepare(model, config, example_inputs=example)
    start = time.perf_counter()
    qswap.calibrate(prepared, shard, progress=False)  # reduces across ranks when distributed
    seconds = time.perf_counter() - start
    qmodel = qswap.convert(prepared)
    mine = digest(qmodel)

    digests = [mine]
    if world > 1:
        digests = [""] * world
        dist.all_gather_object(digests, mine)
    print(
        f"rank {rank}/{world}: calibrated {len(shard)} of {len(batches)} batches in "
        f"{seconds:.2f} s; qparams digest {mine}"
    )

    if rank == 0:
        # One process that observes every batch itself (no reduction involved).
        reference = qswap.prepare(model, config, example_inputs=example)
        with torch.no_grad():
            for batch in batches:
                reference(batch)
        alone = digest(qswap.convert(reference))
        print(f"identical qparams on all {world} rank(s): {len(set(digests)) == 1}")
        print(f"equal to one process that saw all {len(batches)} batches: {alone == mine}")
        x_test, y_test = data.x_test.to(device), data.y_test.to(device)
        print(
            f"accuracy: float {accuracy(model, x_test, y_test):.2f} %, "
            f"quantized ({preset}, min-max) {accuracy(qmodel, x_test, y_test):.2f} %"
        )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
