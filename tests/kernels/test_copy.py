"""copy_blocks on both backends against plain torch indexing, over vLLM's cache layouts.

The triton backend runs in Triton's interpreter on CPU tensors (see conftest.py), so tensors
are tiny. Caches hold random bytes: fp NaN patterns must survive, since bytes are bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_bidkv.kernels import allocate_like, block_copy, block_views, copy_blocks, torch_copy

pytestmark = pytest.mark.kernels

SRC_BLOCKS, DST_BLOCKS = 11, 7
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]
SAME_SIZE_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Layout:
    """How an attention backend shapes one layer's cache, for ``num_blocks`` blocks."""

    name: str
    block_dim: int
    make: Callable[[int, torch.dtype], torch.Tensor]


def random_bytes(
    shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    element_bytes = torch.empty(0, dtype=dtype).element_size()
    count = torch.Size(shape).numel() * element_bytes
    return torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator).view(dtype).view(shape)


LAYOUTS = [
    # CPU backend: [num_blocks, kv_heads, block_size, 2 * head_size]
    Layout("cpu-joint-kv", 0, lambda nb, dtype: random_bytes((nb, 2, 4, 16), dtype)),
    # FlashAttention: [2, num_blocks, block_size, kv_heads, head_size]
    Layout("kv-split-first", 1, lambda nb, dtype: random_bytes((2, nb, 4, 2, 8), dtype)),
    # Block dim second in general, with K/V stored block-first by the stride order.
    Layout(
        "kv-split-stored-block-first",
        1,
        lambda nb, dtype: random_bytes((nb, 2, 4, 2, 8), dtype).transpose(0, 1),
    ),
    Layout("block-dim-third", 2, lambda nb, dtype: random_bytes((3, 2, nb, 4, 8), dtype)),
    # Cross-layer contiguous: [num_blocks, layers, 2, block_size, kv_heads, head_size]
    Layout("cross-layer", 0, lambda nb, dtype: random_bytes((nb, 3, 2, 4, 2, 4), dtype)),
    # Rows with a stride longer than the row (one half of a joint cache).
    Layout("padded-rows", 0, lambda nb, dtype: random_bytes((nb, 2, 4, 8), dtype)[:, 1]),
]

ID_CASES = {
    "random": ([9, 2, 7, 0, 4], [3, 6, 0, 5, 1]),
    "non-contiguous": ([10, 8, 6, 4], [6, 4, 2, 0]),
    "repeated-source": ([5, 5, 1], [0, 1, 2]),
    "single": ([3], [6]),
    "both-runs": ([2, 3, 4], [4, 5, 6]),
    "source-run": ([6, 7, 8], [5, 0, 3]),
    "destination-run": ([9, 1, 4], [1, 2, 3]),
    "empty": ([], []),
}


def expected_copy(
    src_cache: torch.Tensor, dst_cache: torch.Tensor, block_dim: int, src_ids, dst_ids
) -> torch.Tensor:
    """Plain torch indexing along the block dim, on same-size integers so fp8 and NaNs compare."""
    as_ints = SAME_SIZE_INTS[src_cache.element_size()]
    expected = dst_cache.view(as_ints).clone()
    if len(src_ids):
        index = (slice(None),) * block_dim
        expected[(*index, torch.as_tensor(dst_ids))] = src_cache.view(as_ints)[
            (*index, torch.as_tensor(src_ids))
        ]
    return expected


def run_and_compare(layout: Layout, dtype: torch.dtype, src_ids, dst_ids, backend: str) -> None:
    src_cache = layout.make(SRC_BLOCKS, dtype)
    dst_cache = layout.make(DST_BLOCKS, dtype)
    expected = expected_copy(src_cache, dst_cache, layout.block_dim, src_ids, dst_ids)
    copy_blocks(
        block_views(src_cache, SRC_BLOCKS), block_views(dst_cache, DST_BLOCKS), src_ids, dst_ids, backend
    )
    assert torch.equal(dst_cache.view(expected.dtype), expected)


def torch_path_must_not_run(*args: object) -> None:
    raise AssertionError("the triton backend fell back to the torch path")


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "triton":
        request.getfixturevalue("triton_copy")
        monkeypatch.setattr(block_copy, "copy_blocks_torch", torch_path_must_not_run)
    return str(request.param)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_layouts_and_dtypes_match_torch_indexing(layout: Layout, dtype: torch.dtype, backend: str) -> None:
    run_and_compare(layout, dtype, *ID_CASES["random"], backend)


@pytest.mark.parametrize("case", list(ID_CASES))
def test_id_patterns_match_torch_indexing(case: str, backend: str) -> None:
    run_and_compare(LAYOUTS[1], torch.bfloat16, *ID_CASES[case], backend)


def test_ids_may_be_tensors(backend: str) -> None:
    src_ids, dst_ids = ID_CASES["random"]
    run_and_compare(
        LAYOUTS[0], torch.float16, torch.tensor(src_ids, dtype=torch.int32), torch.tensor(dst_ids), backend
    )


def test_store_to_tier_and_load_back_round_trips(backend: str) -> None:
    cache = LAYOUTS[1].make(SRC_BLOCKS, torch.bfloat16)
    original = cache.clone()
    views = block_views(cache, SRC_BLOCKS)
    tier = allocate_like(views, DST_BLOCKS, "cpu", pin_memory=False)
    copy_blocks(views, tier, [8, 1, 5], [0, 6, 3], backend)
    cache.view(torch.int16)[:, [8, 1, 5]] = 0
    copy_blocks(tier, views, [0, 6, 3], [2, 9, 10], backend)
    assert torch.equal(cache[:, [2, 9, 10]].view(torch.int16), original[:, [8, 1, 5]].view(torch.int16))


def test_regions_with_different_row_sizes(backend: str) -> None:
    src = [random_bytes((SRC_BLOCKS, size), torch.uint8) for size in (8, 24, 3)]
    dst = [random_bytes((DST_BLOCKS, size), torch.uint8) for size in (8, 24, 3)]
    expected = [view.clone() for view in dst]
    for src_view, expected_view in zip(src, expected, strict=True):
        expected_view[[4, 0]] = src_view[[10, 3]]
    copy_blocks(src, dst, [10, 3], [4, 0], backend)
    for got, want in zip(dst, expected, strict=True):
        assert torch.equal(got, want)


def test_empty_ids_leave_destination_untouched(backend: str) -> None:
    src = [random_bytes((SRC_BLOCKS, 16), torch.uint8)]
    dst = [random_bytes((DST_BLOCKS, 16), torch.uint8)]
    before = dst[0].clone()
    copy_blocks(src, dst, torch.tensor([], dtype=torch.int64), [], backend)
    assert torch.equal(dst[0], before)


def two_views(src_blocks: int = SRC_BLOCKS, dst_blocks: int = DST_BLOCKS, row: int = 16) -> tuple[list, list]:
    return [torch.zeros(src_blocks, row, dtype=torch.uint8)], [
        torch.zeros(dst_blocks, row, dtype=torch.uint8)
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            lambda: ([*two_views()[0], *two_views()[0]], two_views()[1], [1], [1]),
            "src has 2 block views but dst has 1",
        ),
        (
            lambda: (two_views(row=16)[0], two_views(row=8)[1], [1], [1]),
            "region 0: src rows are 16 bytes but dst rows",
        ),
        (
            lambda: ([torch.zeros(SRC_BLOCKS, 4)], two_views(row=16)[1], [1], [1]),
            r"src\[0\] has dtype torch.float32",
        ),
        (lambda: (*two_views(), [1, 2], [1]), "src_block_ids has 2 ids but dst_block_ids has 1"),
        (lambda: (*two_views(), [1, 11], [1, 2]), r"src_block_ids\[1\] = 11 is out of range \[0, 11\)"),
        (lambda: (*two_views(), [1], [-1]), r"dst_block_ids\[0\] = -1 is out of range \[0, 7\)"),
        (lambda: (*two_views(), [1, 2, 3], [4, 0, 4]), "dst_block_ids repeats block 4"),
        (lambda: (*two_views(), [1.5], [2]), "src_block_ids must hold integers"),
        (lambda: (*two_views(), torch.tensor([1.0]), [2]), "src_block_ids must be a 1-D integer tensor"),
    ],
    ids=[
        "list-lengths",
        "row-sizes",
        "dtype",
        "id-list-lengths",
        "src-out-of-range",
        "dst-out-of-range",
        "duplicate-dst",
        "float-id",
        "float-id-tensor",
    ],
)
def test_invalid_copies_raise(arguments: Callable[[], tuple], message: str, backend: str) -> None:
    with pytest.raises(ValueError, match=message):
        copy_blocks(*arguments(), backend=backend)


def test_reading_and_writing_one_block_of_the_same_view_raises(backend: str) -> None:
    (view,), _ = two_views()
    with pytest.raises(ValueError, match="block 3 is both read and written"):
        copy_blocks([view], [view], [3, 4], [5, 3], backend)
    copy_blocks([view], [view], [3, 4], [5, 6], backend)


@pytest.mark.parametrize(
    ("src_ids", "dst_ids"),
    [([3, 9], [5, 6]), ([3, 4], [9, 6]), ([3, 4], [5, 6]), ([10, 0, 7], [1, 4, 2])],
    ids=["dst-run", "src-run", "both-runs", "random"],
)
def test_copies_within_one_cache(src_ids: list[int], dst_ids: list[int], backend: str) -> None:
    cache = LAYOUTS[1].make(SRC_BLOCKS, torch.float16)
    expected = expected_copy(cache, cache, 1, src_ids, dst_ids)
    views = block_views(cache, SRC_BLOCKS)
    copy_blocks(views, views, src_ids, dst_ids, backend)
    assert torch.equal(cache.view(expected.dtype), expected)


def test_key_half_copied_into_value_half_of_the_same_cache(backend: str) -> None:
    cache = LAYOUTS[1].make(SRC_BLOCKS, torch.float32)
    expected = cache.clone()
    expected[1, [0, 5]] = cache[0, [2, 5]]
    key_view, value_view = block_views(cache, SRC_BLOCKS)
    copy_blocks([key_view], [value_view], [2, 5], [0, 5], backend)
    assert torch.equal(cache.view(torch.int32), expected.view(torch.int32))


@st.composite
def ids_with_runs(draw: st.DrawFn) -> tuple[int, list[int], list[int]]:
    """Id lists made of runs on either side, in shuffled pair order, for 40-block views."""
    blocks = 40
    run_lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=6))
    count = min(sum(run_lengths), blocks)
    dst_ids = draw(st.permutations(range(blocks)))[:count]
    src_ids: list[int] = []
    for length in run_lengths:
        start = draw(st.integers(0, blocks - length))
        src_ids.extend(range(start, start + length))
    src_ids = src_ids[:count]
    if draw(st.booleans()):  # destination runs instead of source runs
        src_ids, dst_ids = draw(st.permutations(range(blocks)))[:count], sorted(dst_ids)
    order = draw(st.permutations(range(count)))
    return draw(st.integers(1, 8)), [src_ids[k] for k in order], [dst_ids[k] for k in order]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=ids_with_runs(), rows_per_job=st.integers(1, 5), padded=st.booleans())
def test_property_runs_and_jobs_split_correctly(
    case: tuple[int, list[int], list[int]], rows_per_job: int, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small runs and jobs, so runs, slices and jobs on several threads all occur; padded rows
    exercise the non-contiguous gather."""
    min_run, src_ids, dst_ids = case
    row_bytes = 48
    monkeypatch.setattr(torch_copy, "_MIN_RUN_BYTES", min_run * row_bytes)
    monkeypatch.setattr(torch_copy, "_JOB_BYTES", rows_per_job * row_bytes)
    monkeypatch.setattr(torch_copy, "_BYTES_PER_THREAD", 1)  # use the pool even for tiny copies
    stride = row_bytes + 16 if padded else row_bytes
    src = [random_bytes((40, stride), torch.uint8)[:, :row_bytes] for _ in range(2)]
    dst = [random_bytes((40, stride), torch.uint8)[:, :row_bytes] for _ in range(2)]
    expected = [view.clone() for view in dst]
    for src_view, expected_view in zip(src, expected, strict=True):
        expected_view[dst_ids] = src_view[src_ids]
    copy_blocks(src, dst, src_ids, dst_ids, "torch")
    for got, want in zip(dst, expected, strict=True):
        assert torch.equal(got, want)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), count=st.integers(1, 60), min_run=st.integers(2, 8), load=st.booleans())
def test_property_a_run_of_tier_slots_is_one_pass_whatever_the_cache_ids(
    data: st.DataObject, count: int, min_run: int, load: bool
) -> None:
    """A store's destinations and a load's sources are consecutive tier slots: no pair is
    staged (two passes), even where the cache's random ids hold chance runs of ``min_run``."""
    first = data.draw(st.integers(0, 100))
    slots = np.arange(first, first + count)[data.draw(st.permutations(range(count)))]
    cache_ids = np.array(data.draw(st.permutations(range(2 * count)))[:count])
    src_ids, dst_ids = (slots, cache_ids) if load else (cache_ids, slots)
    plan = torch_copy._RunPlan(src_ids, dst_ids, min_run)
    assert plan.staged[0].size == 0
    assert all(src_start is not None or dst_start is not None for _, src_start, _, dst_start in plan.runs)
    pairs = {
        (int(s), int(d))
        for run_src, _, run_dst, _ in plan.runs
        for s, d in zip(run_src, run_dst, strict=True)
    }
    assert pairs == {(int(s), int(d)) for s, d in zip(src_ids, dst_ids, strict=True)}


@pytest.mark.parametrize("route", ["_gather_move_scatter", "_store_runs", "_load_runs"])
@pytest.mark.parametrize(
    ("src_ids", "dst_ids"),
    [([9, 2, 7, 0, 4], [3, 6, 0, 5, 1]), ([4, 5, 6, 6, 1, 2], [2, 3, 4, 0, 6, 5])],
    ids=["random", "runs-and-repeats"],
)
@pytest.mark.parametrize(
    ("row_bytes", "stride", "offset"),
    [(48, 48, 0), (48, 64, 0), (12, 20, 4), (6, 6, 2), (5, 7, 1)],
    ids=["8-byte-units", "padded-rows", "4-byte-units", "2-byte-units", "bytes"],
)
def test_device_routes_equal_torch_indexing(
    route: str,
    src_ids: list[int],
    dst_ids: list[int],
    row_bytes: int,
    stride: int,
    offset: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The three routes that serve CUDA pairs (device to device, store to the host, load from
    it), run on CPU tensors (no GPU here; CPU views take the load route, pointed at each route
    in turn): every row alignment, padded host rows (a DMA per row), runs of consecutive ids
    (a DMA per run), repeated sources, and staging split into chunks of 2 rows."""
    monkeypatch.setattr(torch_copy, "_load_runs", getattr(torch_copy, route))
    monkeypatch.setattr(torch_copy, "_DEVICE_STAGING_BYTES", 2 * row_bytes)
    src = random_bytes((SRC_BLOCKS * stride + offset,), torch.uint8)[offset:].view(SRC_BLOCKS, stride)
    dst = random_bytes((DST_BLOCKS * stride + offset,), torch.uint8)[offset:].view(DST_BLOCKS, stride)
    src, dst = src[:, :row_bytes], dst[:, :row_bytes]
    expected = dst.clone()
    expected[dst_ids] = src[src_ids]
    torch_copy._copy_on_devices(src, dst, np.array(src_ids), np.array(dst_ids))
    assert torch.equal(dst, expected)


@pytest.mark.parametrize(
    ("sorted_ids", "runs"),
    [
        ([7], [(0, 7, 1)]),
        ([0, 1, 2, 5, 6, 9], [(0, 0, 3), (3, 5, 2), (5, 9, 1)]),
        ([3, 4, 4, 5], [(0, 3, 2), (2, 4, 2)]),
    ],
    ids=["single", "three-runs", "repeat-starts-a-run"],
)
def test_consecutive_runs(sorted_ids: list[int], runs: list[tuple[int, int, int]]) -> None:
    assert list(torch_copy._consecutive_runs(np.array(sorted_ids))) == runs


def test_pairs_with_a_device_view_take_the_device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A region whose views are not both on the host goes to the device gather/scatter (here a
    meta tensor stands in for CUDA); host regions of the same call still copy their bytes."""
    calls: list[tuple[str, str, list[int], list[int]]] = []
    device_path = torch_copy._copy_on_devices

    def spy(src_view: torch.Tensor, dst_view: torch.Tensor, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        calls.append((src_view.device.type, dst_view.device.type, src_ids.tolist(), dst_ids.tolist()))
        device_path(src_view, dst_view, src_ids, dst_ids)  # runs on meta: shapes and dtypes only

    monkeypatch.setattr(torch_copy, "_copy_on_devices", spy)
    host_src, host_dst = (
        random_bytes((SRC_BLOCKS, 64), torch.uint8),
        random_bytes((DST_BLOCKS, 64), torch.uint8),
    )
    expected = host_dst.clone()
    expected[[0, 6, 2]] = host_src[[3, 9, 1]]
    meta_dst = torch.empty(DST_BLOCKS, 64, dtype=torch.uint8, device="meta")
    copy_blocks([host_src, host_src], [host_dst, meta_dst], [3, 9, 1], [0, 6, 2], "torch")
    assert calls == [("cpu", "meta", [3, 9, 1], [0, 6, 2])]
    assert torch.equal(host_dst, expected)


def test_unknown_backend_raises() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        copy_blocks(*two_views(), [1], [1], backend="cuda")  # type: ignore[arg-type]


def test_triton_backend_refuses_cuda_tensors_in_the_interpreter(triton_copy: ModuleType) -> None:
    assert "interpreter needs CPU tensors" in triton_copy.unsupported_reason([torch.empty(1, device="meta")])


@pytest.mark.parametrize(
    "row_bytes", [48, 12, 6, 5], ids=["8-byte-units", "4-byte-units", "2-byte-units", "bytes"]
)
def test_triton_kernel_copies_regions_of_different_strides(triton_copy: ModuleType, row_bytes: int) -> None:
    """The kernel called directly (not through copy_blocks): one launch over three regions whose
    rows are padded differently, at every row width the kernel moves (8, 4, 2, 1 bytes)."""
    src = [random_bytes((SRC_BLOCKS, row_bytes + pad), torch.uint8)[:, :row_bytes] for pad in (0, 8, 16)]
    dst = [random_bytes((DST_BLOCKS, row_bytes + pad), torch.uint8)[:, :row_bytes] for pad in (16, 0, 8)]
    src_ids, dst_ids = torch.tensor([9, 2, 7, 0, 4]), torch.tensor([3, 6, 0, 5, 1])
    expected = [view.clone() for view in dst]
    for src_view, expected_view in zip(src, expected, strict=True):
        expected_view[dst_ids] = src_view[src_ids]
    triton_copy.copy_blocks_triton(src, dst, src_ids, dst_ids)
    for got, want in zip(dst, expected, strict=True):
        assert torch.equal(got, want)  # written rows, and rows 2 and 4 left as they were


def test_triton_self_check_fails_when_the_kernel_is_wrong(
    triton_copy: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m vllm_bidkv.kernels.triton_copy`` (the check to run on a GPU box) passes on the
    kernel and catches a kernel that copies nothing or the wrong rows."""
    triton_copy.check_against_torch("cpu")
    kernel = triton_copy.copy_blocks_triton
    monkeypatch.setattr(triton_copy, "copy_blocks_triton", lambda *args: None)
    with pytest.raises(AssertionError, match="region 0 differs"):
        triton_copy.check_against_torch("cpu")
    monkeypatch.setattr(
        triton_copy,
        "copy_blocks_triton",
        lambda src, dst, src_ids, dst_ids: kernel(src, dst, src_ids.flip(0), dst_ids),
    )
    with pytest.raises(AssertionError, match="differs from torch indexing"):
        triton_copy.check_against_torch("cpu")


@st.composite
def copy_problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int, list[int], list[int]]:
    """Random dtype, cache shape, block dim position and stride order; random ids (sources may
    repeat). In memory the innermost dim is a non-block dim, so blocks are rows."""
    dtype = draw(st.sampled_from(DTYPES))
    outer_sizes = draw(st.lists(st.integers(1, 4), max_size=2))
    inner_size = draw(st.integers(2, 4))
    src_blocks, dst_blocks = draw(st.integers(5, 9)), draw(st.integers(5, 9))
    block_position = draw(st.integers(0, len(outer_sizes)))
    logical_of_stored = draw(st.permutations(range(len(outer_sizes) + 2)))

    def make(num_blocks: int, seed: int) -> torch.Tensor:
        stored_sizes = [*outer_sizes, inner_size]
        stored_sizes.insert(block_position, num_blocks)
        stored = random_bytes(tuple(stored_sizes), dtype, torch.Generator().manual_seed(seed))
        return stored.permute([logical_of_stored.index(dim) for dim in range(len(stored_sizes))])

    count = draw(st.integers(0, min(src_blocks, dst_blocks)))
    src_ids = draw(st.lists(st.integers(0, src_blocks - 1), min_size=count, max_size=count))
    dst_ids = draw(st.permutations(range(dst_blocks)))[:count]
    block_dim = logical_of_stored[block_position]
    return make(src_blocks, draw(st.integers(0, 99))), make(dst_blocks, 100), block_dim, src_ids, dst_ids


def check_problem(
    problem: tuple[torch.Tensor, torch.Tensor, int, list[int], list[int]], backend: str
) -> None:
    src_cache, dst_cache, block_dim, src_ids, dst_ids = problem
    expected = expected_copy(src_cache, dst_cache, block_dim, src_ids, dst_ids)
    copy_blocks(
        block_views(src_cache, src_cache.shape[block_dim], block_dim=block_dim),
        block_views(dst_cache, dst_cache.shape[block_dim], block_dim=block_dim),
        src_ids,
        dst_ids,
        backend,
    )
    assert torch.equal(dst_cache.view(expected.dtype), expected)


@settings(max_examples=150, deadline=None)
@given(copy_problems())
def test_property_torch_backend_equals_torch_indexing(problem) -> None:
    check_problem(problem, "torch")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=copy_problems())
def test_property_triton_backend_equals_torch_indexing(
    problem, triton_copy: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(block_copy, "copy_blocks_torch", torch_path_must_not_run)
    check_problem(problem, "triton")
