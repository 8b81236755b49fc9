"""This process's place among several training processes, through Accelerate.

Launched plainly (``loraqa train``) there is one process and nothing here talks to anyone.
Launched by ``torchrun`` or ``accelerate launch``, on one machine or several, Accelerate sets up the
process group (gloo on CPUs, NCCL on GPUs), DDP averages gradients, and these helpers sum
counters, gather predictions and keep file writing on the main process. Every rank here is the
*global* one (``RANK``): data is shared out and files are written by it, never by the local rank,
which is 0 on every machine (docs/machines.md).
"""

from __future__ import annotations

import os
import socket

import torch

from loraqa.io import log


class Processes:
    def __init__(self, accelerator=None) -> None:
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0  # global: 0 .. world - 1 over all machines
        self.local_rank = accelerator.local_process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0

    @classmethod
    def single(cls) -> Processes:
        return cls(None)

    @classmethod
    def from_environment(cls) -> Processes:
        """Several processes when a launcher set WORLD_SIZE > 1, else one."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls.single()
        from accelerate import Accelerator

        return cls(Accelerator(cpu=not torch.cuda.is_available()))

    @property
    def device(self) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP-wrap a module that holds trainable weights (unchanged for one process)."""
        if self.world == 1:
            return module
        return self.accelerator.prepare_model(module)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes, on ``tensor``'s device (the collective runs on this process's)."""
        if self.world == 1:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor.to(self.device), reduction="sum").to(tensor.device)

    def max(self, value: int) -> int:
        """The largest ``value`` over processes."""
        if self.world == 1:
            return value
        slots = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        slots[self.rank] = value
        return int(self.sum(slots).max())

    def choose(self, value: str, choices: list[str]) -> str:
        """The main process's ``value`` (one of ``choices``), on every process."""
        picked = torch.zeros(len(choices), dtype=torch.float64, device=self.device)
        if self.is_main:
            picked[choices.index(value)] = 1
        return choices[int(self.sum(picked).argmax())]

    def gather(self, items: list) -> list:
        """Every process's list, concatenated in rank order."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Wait for every process, then take the process group down. Left to the interpreter's exit,
        gloo's threads outlive it: a worker then aborts as it ends ("terminate called without an
        active exception"), and torchrun reports a finished run as failed."""
        if self.world > 1:
            self.accelerator.wait_for_everyone()
            self.accelerator.end_training()

    def describe(self) -> str:
        """This process's place, and whether it writes the run folder (one line per process)."""
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        role = "writes the run folder and the log" if self.is_main else "trains its share; process 0 writes"
        return (f"process {self.rank} of {self.world} (local rank {self.local_rank} on {socket.gethostname()}"
                + (f", after {restarts} restart(s) by torchrun" if restarts else "") + f"): {role}")

    def log(self, message: str) -> None:
        """``io.log`` on the main process only."""
        if self.is_main:
            log(message)
