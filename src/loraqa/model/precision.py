"""Mixed precision: which one a run uses, autocast, and frozen weights stored in it once.

``--precision auto`` picks what is *faster* here, not what is supported: training on CUDA bf16
where the GPU has it, else fp16 (with a gradient scaler); on a CPU without native bf16 (no AVX-512
BF16 / AMX) fp32, as bf16 is emulated there; on a CPU with native bf16, a short timed probe at the
run's shapes decides, bf16 only when clearly faster (measurements: docs/design-notes.md). Answering
is fp32 on a CPU and on a GPU: one answer to a question whatever the batch.

With bf16 (or fp16) the frozen weights of every linear layer are stored in that dtype once, not cast
by autocast at every call; trainable weights, their gradients, the optimizer state, norms and
embeddings stay fp32, so the residual stream does too.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=DTYPES[precision])


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (CPU: AVX-512 BF16 or AMX, through oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


# why answering is fp32 unless told otherwise (measured: docs/speed.md, issue 40; docs/gpu/, issue 43)
ANSWER_IN_FP32 = ("auto: answers in fp32 on a CPU, the same whatever the batch they are decoded in; bf16 "
                  "(--precision bf16) answered 1.38x faster on SmolLM2 here but moved 6 of 96 answers against "
                  "fp32, and an answer can move with the batch it lands in")
ANSWER_IN_FP32_ON_GPU = ("auto: answers in fp32 on a GPU too, the same whatever the batch they are decoded in (an "
                         "answer in bf16 can move with the batch it lands in, and the exactness check skips bf16); "
                         "bf16 (--precision bf16) also answered slower on an H200 (62.5 against 153.4 questions/s, "
                         "docs/gpu/)")

# bf16 must take at least this much less time per step than fp32 on the probe's median to be chosen:
# a few timed steps differ by several percent from run to run, and auto chose bf16 on such noise
# where fp32 trained faster (an AMX CPU: fp32 43.7 s, bf16 48.3 s, issue 43); a near tie is fp32's,
# whose results no rounding moves
BF16_MARGIN = 0.10


def resolve_precision(precision: str, device: torch.device,
                      probe: Callable[[str], float] | None = None, answering: bool = False) -> tuple[str, str]:
    """(precision, why) for the setting ``precision`` on ``device``.

    ``probe(precision)`` returns seconds per step at the run's shapes; with ``auto`` on a CPU
    with native bf16 it is called for fp32 and bf16, and bf16 is taken only when at least
    :data:`BF16_MARGIN` faster (fp32 without a probe).
    ``answering``: ``auto`` answers in fp32, on a CPU (:data:`ANSWER_IN_FP32`) as on a GPU
    (:data:`ANSWER_IN_FP32_ON_GPU`), so evaluate, ask, serve and a merged model give one answer to a
    question whatever the batch.
    """
    if precision != "auto":
        return precision, "set by --precision"
    if answering:
        return "fp32", ANSWER_IN_FP32_ON_GPU if device.type == "cuda" else ANSWER_IN_FP32
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU computes bf16 natively"
        return "fp16", "auto: the GPU has no bf16; fp16 with a gradient scaler"
    if not native_bf16(device):
        return "fp32", "auto: this CPU has no native bf16 (AVX-512 BF16/AMX), so bf16 would be emulated"
    if probe is None:
        return "fp32", "auto: native bf16, but no probe was run; fp32"
    seconds = {p: probe(p) for p in ("fp32", "bf16")}
    faster = 1 - seconds["bf16"] / seconds["fp32"]  # bf16's share of fp32's time saved (negative: slower)
    best = "bf16" if faster >= BF16_MARGIN else "fp32"
    return best, (f"auto: native bf16 CPU; probe at the run's shapes: fp32 {seconds['fp32'] * 1000:.0f} ms/step, "
                  f"bf16 {seconds['bf16'] * 1000:.0f} ms/step ({abs(faster):.0%} "
                  f"{'faster' if faster >= 0 else 'slower'}); bf16 only when at least {BF16_MARGIN:.0%} faster")


def _frozen_linears(model, everything: bool) -> list[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))
            and (everything or not m.weight.requires_grad)]


def store_frozen_weights(model, precision: str, everything: bool = False) -> Callable[[], None]:
    """Store the weights of frozen linear layers in ``precision``'s dtype (all of them with
    ``everything``, for inference); returns a function that puts the original weights back.

    A weight tied to the input embeddings (GPT-2's and SmolLM2's LM head) gets a copy of its own,
    so the embeddings, and with them the residual stream, stay fp32.
    """
    dtype = DTYPES[precision]
    if dtype == torch.float32:
        return lambda: None
    swapped = []
    for module in _frozen_linears(model, everything):
        original = module.weight
        if original.dtype != dtype:
            module.weight = nn.Parameter(original.detach().to(dtype), requires_grad=False)
            swapped.append((module, original))

    def restore() -> None:
        for module, original in swapped:
            module.weight = original

    return restore


def time_steps(step: Callable[[], None], repeats: int = 3) -> float:
    """Seconds per call of ``step``: the median of ``repeats`` calls after one warm-up call (one
    slow call, another process's or a page fault's, does not move it); torch's RNG is left as it
    was, so a probed run draws the same dropout masks as one that was not."""
    rng = torch.get_rng_state()
    step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    torch.set_rng_state(rng)
    return statistics.median(seconds)


def probe_precision(model, step: Callable[[str], None], everything: bool = False) -> Callable[[str], float]:
    """A probe for :func:`resolve_precision`: ``step(precision)`` (one forward, or forward +
    backward, at the run's shapes, under that precision's autocast) timed with the weights stored
    as that precision would store them, then put back."""
    def probe(precision: str) -> float:
        restore = store_frozen_weights(model, precision, everything)
        try:
            return time_steps(lambda: step(precision))
        finally:
            restore()

    return probe


def choose_precision(model, setting: str, device: torch.device, step: Callable[[str], None] | None = None,
                     processes=None, everything: bool = False, answering: bool = False) -> tuple[str, str]:
    """Resolve ``setting`` (probing with ``step`` where ``auto`` needs it) and agree on the main
    process's choice when there are several; the weights are left as they were.
    Returns (precision, why)."""
    probe = probe_precision(model, step, everything) if step is not None else None
    precision, why = resolve_precision(setting, device, probe, answering)
    if processes is not None and processes.world > 1:  # timings differ by process; one choice for all
        chosen = processes.choose(precision, list(DTYPES))
        precision, why = chosen, why if chosen == precision else f"{why}; the main process chose {chosen}"
    return precision, why


def apply_precision(model, setting: str, device: torch.device, step: Callable[[str], None] | None = None,
                    processes=None, everything: bool = False) -> tuple[str, str]:
    """``choose_precision``, then store the frozen weights in it. Returns (precision, why)."""
    precision, why = choose_precision(model, setting, device, step, processes, everything)
    store_frozen_weights(model, precision, everything)
    return precision, why
