"""The Triton kernel also compiles for a real GPU (no GPU needed: Triton compiles to PTX here).

The interpreter runs the kernel's Python, which is looser than the compiler about types and
pointer casts; this catches what it would miss, and checks the alignment hints give 16-byte
vector loads and stores.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.kernels

triton = pytest.importorskip("triton")


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize(
    ("unit", "align", "block", "vector_op"),
    [
        ("int64", 16, 2048, "ld.global.v2.b64"),
        ("int64", 8, 2048, "ld.global.b64"),
        ("uint8", 1, 16384, "ld.global.b8"),
    ],
)
def test_kernel_compiles_to_ptx(unit: str, align: int, block: int, vector_op: str) -> None:
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton was built without the NVIDIA backend")
    from vllm_bidkv.kernels import triton_copy

    kernel = JITFunction(triton_copy.copy_blocks_kernel.fn)  # compiled even if the module is interpreted
    source = ASTSource(
        fn=kernel,
        signature={
            "region_table_ptr": "*i64",
            "pair_ids_ptr": "*i64",
            "num_regions": "i32",
            "num_pairs": "i32",
            "UNIT": "constexpr",
            "ALIGN": "constexpr",
            "BLOCK": "constexpr",
        },
        constexprs={"UNIT": getattr(tl, unit), "ALIGN": align, "BLOCK": block},
    )
    ptx = triton.compile(source, target=GPUTarget("cuda", 80, 32)).asm["ptx"]
    data_ops = set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))
    assert vector_op in data_ops, sorted(data_ops)
