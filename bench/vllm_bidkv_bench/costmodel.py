"""CostModel: how long one engine step takes on a GPU we do not have.

One forward over a batch is priced with a roofline, the larger of its compute time and
its memory time:

* compute: ``2·params`` FLOPs per scheduled token, plus attention's length term
  ``4·layers·hidden·c`` for a token at context position ``c`` (a prefill chunk
  ``[s, s+n)`` costs ``4·layers·hidden·(n·s + n(n−1)/2)``), at ``peak_flops × compute_efficiency``;
* memory: the weights read once per step plus the KV of every scheduled request's whole
  context (``(s + n)·kv_bytes_per_token``), at ``hbm_bytes_per_s × memory_efficiency``.

So decode is memory bound (a step costs ~weights/bandwidth whatever the batch, plus the
batch's KV) and prefill is compute bound (linear in tokens, quadratic in context).

Host↔device copies (the CPU tier) are priced alike for every connector: each copy operation
(one submission: a batched copy call, or one kernel) costs ``copy_overhead_s`` plus its bytes
at the link's rate. One direction alone gets ``h2d/d2h_bytes_per_s``; both at once share
``duplex_bytes_per_s`` (a copy pays the shared rate only while the other direction runs).
When a copy runs, and whether a step waits for it, is the simulator's business (``sim.py``:
each connector's worker as vLLM runs it).

Every number of ``H100_LLAMA3_8B`` comes from ``/work/shared/COST_FACTS.md`` (row named in
the comment), except ``copy_overhead_s`` (a published measurement, an assumption here: see its
comment) and the two efficiency factors (achieved / peak), which are *fitted*
(``vllm_bidkv_bench.calibrate``) so that stock vLLM in the simulator saturates where it did
in bidkv's own calibration of stock vLLM on its testbed (3.81 req/s achieved at 5.7
offered). That row cannot tell compute from memory efficiency apart, so the fit scales
both alike. No fixed per-step overhead is modelled: the row cannot separate it
from the efficiencies either, and CUDA graphs hide most launch cost on an H100.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CostModel:
    name: str
    params: float
    """Model parameters; a token costs 2·params FLOPs in the matmuls."""
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_size: int
    weight_bytes: float
    """Bytes of weights read once per step."""
    peak_flops: float
    """Dense bf16 matmul FLOP/s (measured peak)."""
    hbm_bytes_per_s: float
    """Device memory bandwidth (measured)."""
    h2d_bytes_per_s: float
    """Host→device copy bandwidth, one direction alone."""
    d2h_bytes_per_s: float
    """Device→host copy bandwidth, one direction alone."""
    duplex_bytes_per_s: float
    """Both directions at once, summed."""
    copy_overhead_s: float
    """Fixed cost of one copy operation (one submission), whatever its size."""
    compute_efficiency: float
    """Achieved / peak FLOP/s in a forward (fitted)."""
    memory_efficiency: float
    """Achieved / peak bandwidth in a forward (fitted)."""
    kv_dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_size * self.kv_dtype_bytes

    def forward_s(self, chunks: Iterable[tuple[int, int]]) -> float:
        """One forward over ``(context_start, num_new_tokens)`` per scheduled request."""
        tokens = attention = context = 0
        for start, n in chunks:
            tokens += n
            attention += n * start + n * (n - 1) // 2
            context += start + n
        if tokens == 0:
            return 0.0
        flops = 2 * self.params * tokens + 4 * self.num_layers * self.hidden_size * attention
        read = self.weight_bytes + context * self.kv_bytes_per_token
        compute = flops / (self.peak_flops * self.compute_efficiency)
        memory = read / (self.hbm_bytes_per_s * self.memory_efficiency)
        return max(compute, memory)

    def link_rate(self, *, to_device: bool, duplex: bool) -> float:
        """Bytes per second of one direction; ``duplex`` while the other direction is busy too."""
        if duplex:
            return self.duplex_bytes_per_s / 2
        return self.h2d_bytes_per_s if to_device else self.d2h_bytes_per_s

    def copy_s(self, nbytes: float, *, to_device: bool, duplex: bool) -> float:
        """Time of one host↔device copy operation, the other direction idle throughout or
        (``duplex``) busy throughout."""
        if nbytes <= 0:
            return 0.0
        return self.copy_overhead_s + nbytes / self.link_rate(to_device=to_device, duplex=duplex)

    def with_efficiency(self, efficiency: float) -> CostModel:
        """The same hardware at another achieved fraction of peak, compute and memory alike (the fit)."""
        return replace(self, compute_efficiency=efficiency, memory_efficiency=efficiency)


H100_LLAMA3_8B = CostModel(
    name="h100-llama3-8b",
    params=8.0e9,  # COST_FACTS "Llama-3.1-8B shape": ~8.0 B params
    num_layers=32,  # same row: 32 layers, hidden 4096, 8 KV heads, head_dim 128
    hidden_size=4096,
    num_kv_heads=8,
    head_size=128,  # -> 2·32·8·128·2 B = 128 KiB per token (COST_FACTS "KV bytes per token")
    weight_bytes=16e9,  # COST_FACTS "weights in bf16": ~16 GB
    peak_flops=798e12,  # COST_FACTS "H100 bf16 dense matmul, measured"
    hbm_bytes_per_s=3.0e12,  # COST_FACTS "H100 HBM copy, measured"
    h2d_bytes_per_s=50e9,  # COST_FACTS "host↔device DMA on H100": ~50 GB/s one way
    d2h_bytes_per_s=50e9,
    duplex_bytes_per_s=83.4e9,  # same row: 83.4 GB/s both ways at once
    # Not in COST_FACTS: DualPath (Wu et al., arXiv 2602.21548, 2026, sec. 5.2) measured ~5-7 µs
    # per cudaMemcpyAsync submission; an assumption for every connector's copy call alike.
    copy_overhead_s=6e-6,
    # Fitted by `vllm-bidkv bench calibrate` (grid step 0.02, 3 seeds): 0.28 gives stock 3.92 req/s
    # at 5.7 offered vs bidkv's 3.81 (0.26: 3.65). Low for an H100 (decode ~20 ms/step at batch
    # ~20), i.e. bidkv's testbed was that slow (eager mode, unstated GPU): see calibrate.py.
    compute_efficiency=0.28,
    memory_efficiency=0.28,
)

PRESETS: dict[str, CostModel] = {H100_LLAMA3_8B.name: H100_LLAMA3_8B}
