"""How much memory an inference forward needs, and when to run it in chunks.

Bytes per token of the unchunked forward's peak (no gradients; D hidden, F MLP width, V vocab,
b = 2 for bf16 / 4 for float32 compute), the larger of its two stages:
  Hyena mixer   b * 6 D + 100 D  residual, normed input, 3D projection (compute dtype) and the
                                 float32 convolution: conv copy, FFT spectra of input and filter,
                                 their product, the 2L inverse transform (complex64 = 8 bytes)
  MLP           b * (2 D + 3 F)  residual, normed input, w1 and w2 outputs and their product
  + logits      12 V             compute-dtype logits, their float32 copy and log-softmax
Chunked, the same per-token figure applies to `chunk_tokens` tokens, and the attention KV cache
(2 x D x b per attention layer per token) grows with the whole sequence. benchmarks/bench_long.py
prints this estimate next to the measured peak. Fit (1B width, blocks SDH*, float32, CPU): in
chunks of 4096 it is within 4% of the measured working set (1074/1194/1434 MiB estimated vs
1076/1242/1483 measured at 8K/16K/32K tokens), and it over-estimates the unchunked forward by ~25%
(16224 vs 12973 MiB at 64K; 203 KB per token measured), which only makes automatic chunking start
earlier. A smaller hyena term fitting the unchunked forward would under-estimate chunks, where an
under-estimate picks a chunk too large.

On the CPU, chunked runs fix glibc's mmap threshold (`keep_cpu_heap_flat`): with glibc's default
dynamic threshold, chunk-sized buffers (under 32 MiB) come from the heap once a large buffer was
freed, and the heap fragments as the sequence advances. bench_long measured, at evo2_1b width
(hyena blocks only, chunks of 4096), RSS growing ~23 KB per token beyond the KV cache; with a
fixed 4 MiB threshold the peak was flat (1060 MiB at 16K and 32K tokens) at ~15% more time.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from evo2_hydra.config import ModelConfig
from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)

GIB = 2**30
MIN_CHUNK = 1024
# The unchunked forward runs when its estimate is under this share of the free memory.
UNCHUNKED_SHARE = 0.5
CHUNK_SHARE = 0.25  # a chunk's activations aim at this share of the free memory
KV_SHARE = 0.9  # ... and the KV cache plus the chunk stay under this share


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 4 << 20  # buffers of 4 MiB and more get their own mapping, unmapped when freed
_heap_fixed = False


def keep_cpu_heap_flat() -> bool:
    """Make large CPU buffers separate mappings for the rest of this process (see the module
    docstring): chunked inference then holds the KV cache plus one chunk, not a fragmented heap.
    Returns whether the threshold is fixed (False where the C library is not glibc).
    """
    global _heap_fixed
    if not _heap_fixed:
        try:
            _heap_fixed = ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        except (OSError, AttributeError):  # not glibc
            return False
        log.debug("mmap threshold fixed at %d bytes for chunked CPU inference", MMAP_THRESHOLD)
    return _heap_fixed


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def activation_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Activation bytes per token of one forward (the largest block), for choosing chunk sizes."""
    b, d, f = _bytes(dtype), cfg.hidden_size, cfg.mlp_inner_size
    hyena = b * 6 * d + 100 * d
    mlp = b * (2 * d + 3 * f)
    return max(hyena, mlp) + 12 * cfg.vocab_size


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of attention keys and values cached per token."""
    return cfg.layer_types().count("attention") * 2 * cfg.hidden_size * _bytes(dtype)


def longest_sequence(
    cfg: ModelConfig,
    params: int,
    device_bytes: float,
    dtype: torch.dtype = torch.bfloat16,
    chunk: int = 4096,
    overhead: float = 2 * GIB,
) -> int:
    """Tokens one sequence may have when scored in chunks on a device of `device_bytes`: what is
    left after the weights, the CUDA context and one chunk's activations, divided by the KV cache
    and the token ids (8 bytes) per token. The chunk is counted three times: on the CPU (fixed
    heap) bench_long measured a chunk's working set at the estimate (within 4%), but the GPU's
    caching allocator was never measured here (no GPU lent), so its slack keeps a margin.
    """
    left = device_bytes - params * _bytes(dtype) - overhead
    left -= 3 * chunk * activation_bytes_per_token(cfg, dtype)
    return max(0, int(left // (kv_bytes_per_token(cfg, dtype) + 8)))


def forward_bytes(cfg: ModelConfig, batch: int, length: int, chunk: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes beyond the weights; `chunk` = 0 for the unchunked forward."""
    live = length if not chunk else min(chunk, length)
    return batch * (
        live * activation_bytes_per_token(cfg, dtype) + length * kv_bytes_per_token(cfg, dtype)
    )


def free_bytes(device: torch.device) -> int:
    """Free memory on a device (GPU: CUDA's count; CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GIB  # unknown: assume a small machine


def choose_chunk_tokens(
    cfg: ModelConfig,
    batch: int,
    length: int,
    dtype: torch.dtype,
    device: torch.device,
    available: int | None = None,
) -> int:
    """0 (unchunked) when the whole forward fits, else the chunk length that fits; one line
    naming the sizes when even the KV cache alone does not fit.
    """
    free = free_bytes(device) if available is None else available
    if forward_bytes(cfg, batch, length, 0, dtype) <= UNCHUNKED_SHARE * free:
        return 0
    kv = batch * length * kv_bytes_per_token(cfg, dtype)
    room = min(CHUNK_SHARE * free, KV_SHARE * free - kv)  # the KV cache may take most of it
    per_token = batch * activation_bytes_per_token(cfg, dtype)
    if room < MIN_CHUNK * per_token:
        raise UserError(
            f"a batch of {batch} x {length} tokens needs {kv / GIB:.1f} GiB of attention KV cache "
            f"plus {MIN_CHUNK * per_token / GIB:.2f} GiB per {MIN_CHUNK}-token chunk, but {device} "
            f"has {free / GIB:.1f} GiB free; use a smaller batch, shorter sequences or bfloat16"
        )
    chunk = int(room // per_token) // MIN_CHUNK * MIN_CHUNK
    return min(chunk, length)
