"""Copy benchmark: GB/s of ``copy_blocks`` against one contiguous ``copy_`` of the same bytes.

Each case copies ``blocks`` blocks of ``block_bytes`` in each of ``layers`` regions, in one
direction, with one id pattern:

* ``store``: the KV cache -> the CPU tier; ``load``: the tier -> the cache. On CUDA the tier is
  pinned host memory; on CPU both are host memory. CUDA also has ``d2d`` (cache -> cache).
* ``tier``: what the system produces. Cache block ids are random (no two adjacent, random
  order), tier slots one run of consecutive ids, as ``CpuBlockTier`` hands them out.
* ``random``: random ids on both sides (no two adjacent, so no run can be coalesced): the
  worst case, e.g. a tier fragmented by eviction.

Each repeat times the memcpy reference and then the backend, back to back, so their ratio sees
the same machine load; reported numbers are medians over repeats. On a loaded CPU the reference
(torch's ``copy_``, parallelized by OpenMP) can stall in OpenMP's barrier for milliseconds
while another process holds a core: a copy of a few MiB then shows ``memcpy_gbps`` under 1 and a
ratio far above 1. Read ``gbps`` there, and ``load_average_1m`` (per result).

On CPU only the torch backend runs (the Triton interpreter is for correctness, not speed). On
CUDA the backends are torch, triton and ``per_block`` (one ``copy_``, i.e. one
``cudaMemcpyAsync``, per block and region).

    vllm-bidkv bench copy --json copy.json
    python -m vllm_bidkv_bench.copy --json copy.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vllm_bidkv.kernels.block_copy import BACKENDS, copy_blocks
from vllm_bidkv_bench.args import positive_int

KIB = 1 << 10
DEFAULT_BLOCK_COUNTS = (16, 64, 256, 1024)
DEFAULT_BLOCK_SIZES_BYTES = (16 * KIB, 64 * KIB, 256 * KIB)
DEFAULT_MAX_COPY_BYTES = 512 << 20
DEFAULT_REPEATS = 15
CPU_BACKENDS = ("torch",)
CUDA_BACKENDS = ("torch", "triton", "per_block")
ID_PATTERNS = ("tier", "random")


def run_copy_bench(
    json_path: str | None = None,
    block_counts: Sequence[int] = DEFAULT_BLOCK_COUNTS,
    block_sizes_bytes: Sequence[int] = DEFAULT_BLOCK_SIZES_BYTES,
    layers: int = 8,
    repeats: int = DEFAULT_REPEATS,
    backends: Sequence[str] | None = None,
    device: str | None = None,
    max_copy_bytes: int = DEFAULT_MAX_COPY_BYTES,
    id_patterns: Sequence[str] = ID_PATTERNS,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the sweep; return (and write to ``json_path`` if given) ``{"results", "machine"}``.

    One result per (backend, ids, direction, blocks, block_bytes) with ``gbps``,
    ``memcpy_gbps`` and ``ratio_to_memcpy`` (median of per-repeat ratios). Cases copying more
    than ``max_copy_bytes`` are skipped (each case allocates about 6x the copied bytes).
    """
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = torch_device.type == "cuda"
    chosen_backends = tuple(backends or (CUDA_BACKENDS if on_cuda else CPU_BACKENDS))
    # d2d involves no tier, so it has no tier pattern.
    cases = [
        (ids, direction)
        for ids in id_patterns
        for direction in ("store", "load", "d2d")
        if direction != "d2d" or (on_cuda and ids == "random")
    ]
    load_average_start = list(os.getloadavg())
    results = []
    for block_bytes in block_sizes_bytes:
        for blocks in block_counts:
            if blocks * block_bytes * layers > max_copy_bytes:
                if verbose:
                    print(f"skip {blocks} blocks x {block_bytes} B x {layers}: over {max_copy_bytes} bytes")
                continue
            for ids, direction in cases:
                case = _Case(torch_device, ids, direction, blocks, block_bytes, layers)
                for backend in chosen_backends:
                    results.append(case.measure(backend, repeats))
                    if verbose:
                        _print_row(results[-1])
                del case  # free this case's buffers before the next one is allocated
    machine = _machine(torch_device)
    # Other processes on the box move both numbers; the load says how much to trust them.
    machine["load_average_end"] = list(os.getloadavg())
    machine["load_average_start"] = load_average_start
    report = {"results": results, "machine": machine}
    if json_path:
        with open(json_path, "w") as file:
            json.dump(report, file, indent=2)
    return report


class _Case:
    """Source and destination block views, their ids and the memcpy reference for one case."""

    def __init__(
        self, device: torch.device, ids: str, direction: str, blocks: int, block_bytes: int, layers: int
    ) -> None:
        self.device, self.ids, self.direction = device, ids, direction
        self.blocks, self.block_bytes, self.layers = blocks, block_bytes, layers
        self.copy_bytes = blocks * block_bytes * layers
        src_device, dst_device = _endpoints(device, direction)
        pool = 2 * blocks
        self.src = [_filled((pool, block_bytes), src_device) for _ in range(layers)]
        self.dst = [_filled((pool, block_bytes), dst_device) for _ in range(layers)]
        self.src_ids, self.dst_ids = _ids(ids, direction, blocks)
        self.reference_src = _filled((self.copy_bytes,), src_device)
        self.reference_dst = _filled((self.copy_bytes,), dst_device)

    def measure(self, backend: str, repeats: int) -> dict[str, Any]:
        run = self._runner(backend)
        run()
        self._memcpy()
        self._check()
        memcpy_seconds, backend_seconds = [], []
        for _ in range(repeats):
            memcpy_seconds.append(self._timed(self._memcpy))
            backend_seconds.append(self._timed(run))
        ratios = [m / b for m, b in zip(memcpy_seconds, backend_seconds, strict=True)]
        return {
            "backend": backend,
            "ids": self.ids,
            "direction": self.direction,
            "blocks": self.blocks,
            "block_bytes": self.block_bytes,
            "layers": self.layers,
            "bytes": self.copy_bytes,
            "gbps": self.copy_bytes / statistics.median(backend_seconds) / 1e9,
            "memcpy_gbps": self.copy_bytes / statistics.median(memcpy_seconds) / 1e9,
            "ratio_to_memcpy": statistics.median(ratios),
            "repeats": repeats,
            "device": str(self.device),
            "load_average_1m": os.getloadavg()[0],
        }

    def _runner(self, backend: str) -> Callable[[], None]:
        if backend == "per_block":
            return self._per_block
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown benchmark backend {backend!r}; expected per_block or one of {BACKENDS}"
            )
        return lambda: copy_blocks(self.src, self.dst, self.src_ids, self.dst_ids, backend=backend)

    def _per_block(self) -> None:
        for src_view, dst_view in zip(self.src, self.dst, strict=True):
            for src_id, dst_id in zip(self.src_ids, self.dst_ids, strict=True):
                dst_view[dst_id].copy_(src_view[src_id], non_blocking=True)

    def _memcpy(self) -> None:
        self.reference_dst.copy_(self.reference_src, non_blocking=True)

    def _check(self) -> None:
        for src_view, dst_view in zip(self.src, self.dst, strict=True):
            if not torch.equal(dst_view[self.dst_ids].cpu(), src_view[self.src_ids].cpu()):
                raise AssertionError(
                    f"copy mismatch in {self.ids} {self.direction} case of {self.blocks} blocks"
                )

    def _timed(self, run: Callable[[], None]) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            run()
            return time.perf_counter() - start
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        run()
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def _endpoints(device: torch.device, direction: str) -> tuple[torch.device | str, torch.device | str]:
    """(source, destination) of a direction; ``"pinned"`` is pinned host memory."""
    tier = "pinned" if device.type == "cuda" else "cpu"
    if direction == "store":
        return device, tier
    if direction == "load":
        return tier, device
    return device, device


def _ids(ids: str, direction: str, blocks: int) -> tuple[list[int], list[int]]:
    """(source ids, destination ids) into pools of ``2 * blocks`` rows.

    Random ids are even on one side and odd on the other, in random order: no two adjacent.
    Tier slots are one run starting at a random slot, in order (the tier's reserve order).
    """
    cache_ids = (2 * torch.randperm(blocks)).tolist()
    if ids == "random":
        other_ids = (2 * torch.randperm(blocks) + 1).tolist()
    elif ids == "tier":
        first = int(torch.randint(blocks + 1, ()))
        other_ids = list(range(first, first + blocks))
    else:
        raise ValueError(f"unknown id pattern {ids!r}; expected one of {ID_PATTERNS}")
    return (other_ids, cache_ids) if direction == "load" else (cache_ids, other_ids)


def _filled(shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """Random bytes, touched so page faults are not timed; ``"pinned"`` means pinned host memory."""
    pinned = device == "pinned"
    tensor = torch.empty(shape, dtype=torch.uint8, device="cpu" if pinned else device, pin_memory=pinned)
    return tensor.random_(0, 256)


def _machine(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _print_row(row: dict[str, Any]) -> None:
    case = f"{row['blocks']:>5} blocks x {row['block_bytes'] // KIB:>4} KiB x {row['layers']}"
    speeds = (
        f"{row['gbps']:7.2f} GB/s  memcpy {row['memcpy_gbps']:7.2f} GB/s  ratio {row['ratio_to_memcpy']:.2f}"
    )
    print(f"{row['backend']:>9} {row['ids']:>6} {row['direction']:>5} {case} : {speeds}", flush=True)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``vllm-bidkv bench copy``."""
    parser.add_argument("--json", metavar="FILE", help="write {results, machine} as JSON here")
    parser.add_argument(
        "--blocks", type=positive_int, nargs="+", default=list(DEFAULT_BLOCK_COUNTS), help="block counts"
    )
    parser.add_argument(
        "--block-kib",
        type=positive_int,
        nargs="+",
        default=[size // KIB for size in DEFAULT_BLOCK_SIZES_BYTES],
        help="bytes per block and region, in KiB",
    )
    parser.add_argument("--layers", type=positive_int, default=8, help="regions (layers) per block")
    parser.add_argument("--repeats", type=positive_int, default=DEFAULT_REPEATS)
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=(*BACKENDS, "per_block"),
        help="default: torch on CPU; torch triton per_block on CUDA",
    )
    parser.add_argument("--device", type=_device, help="cpu or cuda[:N]; default cuda when available")
    parser.add_argument(
        "--ids",
        nargs="+",
        choices=ID_PATTERNS,
        default=list(ID_PATTERNS),
        help="id patterns: tier (random cache ids <-> consecutive tier slots), random (both sides random)",
    )
    parser.add_argument(
        "--max-mib",
        type=positive_int,
        default=DEFAULT_MAX_COPY_BYTES >> 20,
        help="skip cases copying more than this",
    )


def _device(text: str) -> str:
    try:
        torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def main(args: argparse.Namespace) -> int:
    """Run ``vllm-bidkv bench copy`` with parsed ``args``; returns an exit code."""
    run_copy_bench(
        json_path=args.json,
        block_counts=args.blocks,
        block_sizes_bytes=[kib * KIB for kib in args.block_kib],
        layers=args.layers,
        repeats=args.repeats,
        backends=args.backends,
        device=args.device,
        max_copy_bytes=args.max_mib << 20,
        id_patterns=args.ids,
    )
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m vllm_bidkv_bench.copy", description=__doc__.splitlines()[0])
    add_cli_args(cli)
    raise SystemExit(main(cli.parse_args()))
