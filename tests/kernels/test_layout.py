"""block_views and allocate_like: each layout's views hold exactly each block's bytes."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_bidkv.kernels import allocate_like, block_views

pytestmark = pytest.mark.kernels

NUM_BLOCKS = 11


def random_cache(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    element_bytes = torch.empty(0, dtype=dtype).element_size()
    count = torch.Size(shape).numel() * element_bytes
    return torch.randint(0, 256, (count,), dtype=torch.uint8).view(dtype).view(shape)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements in logical order, as bytes."""
    return tensor.contiguous().view(-1).view(torch.uint8)


def test_block_first_cpu_backend_layout_is_one_view_per_cache() -> None:
    cache = random_cache(NUM_BLOCKS, 2, 4, 16)  # [num_blocks, kv_heads, block_size, 2 * head_size]
    (view,) = block_views(cache, NUM_BLOCKS)
    assert view.shape == (NUM_BLOCKS, 2 * 4 * 16 * 2) and view.dtype == torch.uint8
    for block in range(NUM_BLOCKS):
        assert torch.equal(view[block], as_bytes(cache[block]))


def test_kv_split_first_gives_k_then_v_views() -> None:
    cache = random_cache(
        2, NUM_BLOCKS, 4, 2, 8
    )  # FlashAttention: [2, num_blocks, block_size, heads, head_size]
    key_view, value_view = block_views(cache, NUM_BLOCKS)
    for block in range(NUM_BLOCKS):
        assert torch.equal(key_view[block], as_bytes(cache[0, block]))
        assert torch.equal(value_view[block], as_bytes(cache[1, block]))


def test_block_dim_second_in_general_gives_one_view_per_outer_index() -> None:
    cache = random_cache(3, 5, NUM_BLOCKS, 4, dtype=torch.float32)
    views = block_views(cache, NUM_BLOCKS)
    assert len(views) == 15
    for outer in range(15):
        first, second = divmod(outer, 5)
        for block in range(NUM_BLOCKS):
            assert torch.equal(views[outer][block], as_bytes(cache[first, second, block]))


def test_kv_split_stored_block_first_is_one_contiguous_row() -> None:
    # vLLM's stride order can store the logical [2, num_blocks, ...] as [num_blocks, 2, ...].
    cache = random_cache(NUM_BLOCKS, 2, 4, 2, 8).transpose(0, 1)
    (view,) = block_views(cache, NUM_BLOCKS)
    for block in range(NUM_BLOCKS):
        assert torch.equal(view[block], as_bytes(cache[:, block]))


def test_cross_layer_layout_is_one_row_per_block() -> None:
    cache = random_cache(NUM_BLOCKS, 3, 2, 4, 2, 8, dtype=torch.bfloat16)  # [num_blocks, layers, ...]
    (view,) = block_views(cache, NUM_BLOCKS)
    assert view.shape == (NUM_BLOCKS, 3 * 2 * 4 * 2 * 8 * 2)
    assert torch.equal(view[4], as_bytes(cache[4]))


def test_padded_rows_keep_their_stride() -> None:
    cache = random_cache(NUM_BLOCKS, 2, 4, 16)[:, 0]
    (view,) = block_views(cache, NUM_BLOCKS)
    assert view.shape == (NUM_BLOCKS, 4 * 16 * 2) and view.stride() == (2 * 4 * 16 * 2, 1)
    assert torch.equal(view[7], as_bytes(cache[7]))


def test_strided_inner_dim_splits_blocks_into_regions() -> None:
    cache = random_cache(NUM_BLOCKS, 4, 3, 8)[:, ::2]  # every other head
    views = block_views(cache, NUM_BLOCKS)
    assert len(views) == 2
    assert torch.equal(views[1][5], as_bytes(cache[5, 1]))


def test_several_candidate_dims_take_the_outermost() -> None:
    cache = random_cache(8, 8, 4, 2)
    (view,) = block_views(cache, 8)
    assert torch.equal(view[3], as_bytes(cache[3]))


def test_block_dim_argument_resolves_two_block_ambiguity() -> None:
    cache = random_cache(2, 2, 4, 8)
    with pytest.raises(ValueError, match=r"dims \[0, 1\] all have size num_blocks=2"):
        block_views(cache, 2)
    key_view, value_view = block_views(cache, 2, block_dim=1)
    assert torch.equal(value_view[1], as_bytes(cache[1, 1]))


@pytest.mark.parametrize(
    ("cache", "num_blocks", "message"),
    [
        (random_cache(4, 5, 6), 7, r"KV cache of shape \(4, 5, 6\).*no dim has size num_blocks=7"),
        (random_cache(NUM_BLOCKS, 4, 16)[..., ::2], NUM_BLOCKS, r"shape \(11, 4, 8\).*not contiguous"),
        (random_cache(8, NUM_BLOCKS), NUM_BLOCKS, r"shape \(8, 11\).*not contiguous"),
        (torch.zeros(1, 16).expand(NUM_BLOCKS, 16), NUM_BLOCKS, r"shape \(11, 16\).*overlap"),
    ],
    ids=["no-block-dim", "strided-innermost", "block-dim-innermost", "overlapping-blocks"],
)
def test_block_views_rejects_layouts_without_contiguous_rows(
    cache: torch.Tensor, num_blocks: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        block_views(cache, num_blocks)


def test_block_dim_argument_must_have_num_blocks() -> None:
    with pytest.raises(ValueError, match="block_dim=2 does not have size num_blocks=11"):
        block_views(random_cache(NUM_BLOCKS, 4, 5), NUM_BLOCKS, block_dim=2)


def test_allocate_like_matches_row_sizes() -> None:
    views = block_views(random_cache(2, NUM_BLOCKS, 4, 2, 8), NUM_BLOCKS)
    tier = allocate_like(views, 5, "cpu", pin_memory=False)
    assert [buffer.shape for buffer in tier] == [(5, 4 * 2 * 8 * 2)] * 2
    assert all(buffer.dtype == torch.uint8 and buffer.is_contiguous() for buffer in tier)


def test_allocate_like_rejects_non_views_and_pinned_device_memory() -> None:
    with pytest.raises(ValueError, match=r"views\[0\] has shape \(3,\) and dtype torch.float32"):
        allocate_like([torch.zeros(3)], 5, "cpu", pin_memory=False)
    with pytest.raises(ValueError, match="pin_memory applies to host buffers"):
        allocate_like([torch.zeros(3, 4, dtype=torch.uint8)], 5, "meta", pin_memory=True)


def test_allocate_like_is_one_allocation_of_disjoint_rows() -> None:
    views = block_views(random_cache(2, NUM_BLOCKS, 4, 2, 8), NUM_BLOCKS)
    tier = allocate_like(views, 5, "cpu", pin_memory=False)
    storages = {buffer.untyped_storage().data_ptr() for buffer in tier}
    assert len(storages) == 1, "every view's rows live in one arena"
    assert tier[0].untyped_storage().nbytes() == sum(b.numel() for b in tier)
    tier[0].fill_(1)
    tier[1].fill_(2)
    assert int(tier[0].min()) == 1 and int(tier[1].max()) == 2, "regions do not overlap"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _resident_pages(address: int, nbytes: int) -> int:
    """Pages of ``[address, address + nbytes)`` in RAM now (``/proc/self/pagemap``, bit 63)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = address // page, (address + nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = f.read((last - first + 1) * 8)
    return sum(entries[i + 7] >> 7 for i in range(0, len(entries), 8))


def test_a_full_tier_takes_its_size_in_resident_memory() -> None:
    """N bytes of tier, filled, cost N of RSS (not 2N, as power-of-two rounding would): every
    page of the tier's own range is resident, and the process grew by no more than a few MiB
    besides them (an allocation rounded up and touched would add ~N)."""
    page = os.sysconf("SC_PAGE_SIZE")
    row = 3 * 2**20 + 4096  # a row just over a power of two: rounding would nearly double it
    views = [torch.zeros(2, row, dtype=torch.uint8)]
    before = _rss_bytes()
    (tier,) = allocate_like(views, 64, "cpu", pin_memory=False)
    size = tier.numel()
    tier.fill_(7)  # touch every page
    grown = _rss_bytes() - before
    own = _resident_pages(tier.data_ptr(), size) * page
    assert own >= size - page, f"only {own} of the tier's {size} bytes are resident after filling it"
    assert grown - own <= 4 * 2**20, (
        f"a tier of {size} bytes grew RSS by {grown}: {grown - own} beyond its own pages"
    )
