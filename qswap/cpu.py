"""What this machine's int8 kernels compute exactly: do u8 x s8 dot products saturate?

x86 CPUs without VNNI (before Cascade Lake and Zen 4; e.g. AMD EPYC up to Zen 3) have no
instruction that multiplies uint8 by int8 and adds into 32 bits. fbgemm (torch's ``x86``
engine) and ONNX Runtime then use ``vpmaddubsw``, which adds each *pair* of products in a
16-bit register that saturates at 32767: with activations over the full 0..255 range and
weights over the full int8 range a pair reaches 2 x 255 x 127 = 64770, and outputs are
silently wrong (up to tens of output steps). Keeping either operand to 7 bits is exact
(2 x 255 x 64 = 32640, 2 x 127 x 128 = 32512); that is what ``reduce_range`` is for.

Whether a runtime saturates is *measured* by the backend that runs it, not guessed from CPU
flags: a product that needs 17 bits per pair goes through the runtime's own kernel once per
process (``Backend.saturates``; about a millisecond for fbgemm, ten for ONNX Runtime). That
also honours what picks the kernel besides the CPU (``FBGEMM_ENABLE_INSTRUCTIONS``, an
emulator's CPU model, a newer runtime). This module holds the arithmetic and the words;
nothing runs at import.

    >>> from qswap.cpu import pair_saturates
    >>> pair_saturates(act_codes=255, weight_range=(-128, 127))
    True
    >>> pair_saturates(act_codes=255, weight_range=(-64, 63))
    False
"""

from __future__ import annotations

import torch

__all__ = ["capability", "pair_saturates", "saturation_reason"]

_INT16_MAX = 32767


def capability() -> str:
    """torch's name for this CPU's vector instructions (``AVX2``, ``AVX512``, ``DEFAULT``...).

    >>> isinstance(capability(), str)
    True
    """
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return "unknown"


def pair_saturates(*, act_codes: int, weight_range: tuple[int, int]) -> bool:
    """Whether a pair of u8 x s8 products can leave int16 (``vpmaddubsw``'s sum).

    ``act_codes`` is the largest uint8 code the activations take (255 for 8 bits, 127 with
    ``reduce_range``), ``weight_range`` the weights' ``(quant_min, quant_max)``.

    >>> pair_saturates(act_codes=127, weight_range=(-128, 127))
    False
    """
    lo, hi = weight_range
    return 2 * act_codes * max(hi, 0) > _INT16_MAX or 2 * act_codes * max(-lo, 0) > _INT16_MAX + 1


def saturation_reason(runtime: str) -> str:
    """Why ``runtime``'s int8 sums saturate on this machine, as a clause for plans and errors.

    >>> "16 bits" in saturation_reason("ONNX Runtime")
    True
    """
    return (
        f"on this CPU (torch capability {capability()}, no VNNI) {runtime} adds pairs of "
        "u8 x s8 products in 16 bits, which saturate when 8-bit activations meet 8-bit weights"
    )
