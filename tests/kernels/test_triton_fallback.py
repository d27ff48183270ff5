"""The triton backend's launch and its failures, in Triton's interpreter (see conftest.py): the
argument table the kernel gets, and ``auto`` falling back to torch once, with one warning."""

from __future__ import annotations

import logging
import sys
from types import ModuleType

import pytest
import torch

import vllm_bidkv.kernels
from vllm_bidkv.kernels import block_copy, copy_blocks

pytestmark = pytest.mark.kernels

ID_ROUNDS = [([9, 2, 7], [3, 6, 0]), ([1, 4], [5, 2]), ([0], [1])]


class FailingLaunch:
    """Stands in for the kernel's ``run`` (what ``kernel[grid](...)`` calls, compiling first if
    needed): every launch raises, as a failed PTX compile would."""

    def __init__(self) -> None:
        self.launches = 0

    def __call__(self, *args: object, **kwargs: object) -> None:
        self.launches += 1
        raise RuntimeError("simulated PTX compile failure")


class RecordingLaunch:
    """Stands in for the kernel's ``run``: records the arguments of each launch."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple, dict]] = []

    def __call__(self, *args: object, **kwargs: object) -> None:
        self.launches.append((args, kwargs))


@pytest.fixture
def auto_tries_triton(triton_copy: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``auto`` tries triton only when a view is on CUDA; there is no GPU here, so it is told one
    is, and the interpreter's kernel is tried on CPU tensors. No failure is remembered yet."""
    monkeypatch.setattr(block_copy, "_has_cuda_view", lambda views: True)
    monkeypatch.setattr(block_copy, "_triton_failure", None)
    return triton_copy


def views(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    src = [torch.randint(0, 256, (11, 24), dtype=torch.uint8, generator=generator) for _ in range(2)]
    dst = [torch.randint(0, 256, (7, 24), dtype=torch.uint8, generator=generator) for _ in range(2)]
    return src, dst


def copy_and_check(backend: str, src_ids: list[int], dst_ids: list[int], seed: int) -> None:
    src, dst = views(seed)
    expected = [view.clone() for view in dst]
    for src_view, expected_view in zip(src, expected, strict=True):
        expected_view[dst_ids] = src_view[src_ids]
    copy_blocks(src, dst, src_ids, dst_ids, backend)  # type: ignore[arg-type]
    for got, want in zip(dst, expected, strict=True):
        assert torch.equal(got, want)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vllm_bidkv" and r.levelno == logging.WARNING]


def test_auto_falls_back_to_torch_once_with_one_warning(
    auto_tries_triton: ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = FailingLaunch()
    monkeypatch.setattr(auto_tries_triton.copy_blocks_kernel, "run", kernel)
    caplog.set_level(logging.WARNING, logger="vllm_bidkv")
    for seed, (src_ids, dst_ids) in enumerate(ID_ROUNDS):
        copy_and_check("auto", src_ids, dst_ids, seed)
    assert kernel.launches == 1, "after the failure, auto goes straight to torch"
    (warning,) = warnings_of(caplog)
    assert "RuntimeError: simulated PTX compile failure" in warning and "torch backend" in warning


def test_explicit_triton_raises_each_time_and_does_not_disable_auto(
    auto_tries_triton: ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = FailingLaunch()
    monkeypatch.setattr(auto_tries_triton.copy_blocks_kernel, "run", kernel)
    caplog.set_level(logging.WARNING, logger="vllm_bidkv")
    for src_ids, dst_ids in ID_ROUNDS[:2]:
        with pytest.raises(RuntimeError, match="kernel failed to compile or launch: simulated PTX"):
            copy_blocks(*views(0), src_ids, dst_ids, "triton")
    assert kernel.launches == 2 and block_copy._triton_failure is None
    assert warnings_of(caplog) == []


def test_auto_without_triton_warns_once(
    auto_tries_triton: ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed import is remembered too: it is not retried (a path search) on every copy."""
    monkeypatch.delattr(vllm_bidkv.kernels, "triton_copy")
    monkeypatch.setitem(sys.modules, "vllm_bidkv.kernels.triton_copy", None)
    caplog.set_level(logging.WARNING, logger="vllm_bidkv")
    with pytest.raises(ValueError, match="backend='triton' cannot run this copy: triton is not importable"):
        copy_blocks(*views(0), [1], [2], "triton")
    for seed, (src_ids, dst_ids) in enumerate(ID_ROUNDS):
        copy_and_check("auto", src_ids, dst_ids, seed)
    (warning,) = warnings_of(caplog)
    assert "triton is not importable" in warning


def test_a_copy_triton_cannot_address_is_no_failure(
    auto_tries_triton: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    """auto copies it with torch, silently, and still tries triton on the next copy."""
    caplog.set_level(logging.WARNING, logger="vllm_bidkv")
    src, dst = views(0)
    meta_dst = [torch.empty(7, 24, dtype=torch.uint8, device="meta") for _ in dst]
    copy_blocks(src, meta_dst, [1, 2], [3, 4], "auto")  # the interpreter refuses non-CPU views
    assert warnings_of(caplog) == [] and block_copy._triton_failure is None


def test_launch_gets_the_region_table_and_ids_in_one_int64_tensor(
    triton_copy: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staged arguments: source bases, destination bases, row strides of each side and row
    lengths (in 8-byte units here), then the source ids and the destination ids."""
    kernel = RecordingLaunch()
    monkeypatch.setattr(triton_copy.copy_blocks_kernel, "run", kernel)
    src = [torch.zeros(11, 40, dtype=torch.uint8), torch.zeros(11, 48, dtype=torch.uint8)[:, :40]]
    dst = [torch.zeros(7, 56, dtype=torch.uint8)[:, :40], torch.zeros(7, 40, dtype=torch.uint8)]
    triton_copy.copy_blocks_triton(src, dst, torch.tensor([9, 2, 7]), [3, 6, 0])
    ((args, kwargs),) = kernel.launches
    arguments, pair_ids, num_regions, num_pairs = args
    assert arguments.dtype == torch.int64 and arguments.device.type == "cpu"
    assert arguments.tolist() == [
        *(view.data_ptr() for view in src),
        *(view.data_ptr() for view in dst),
        40 // 8,
        48 // 8,
        56 // 8,
        40 // 8,
        40 // 8,
        40 // 8,
        9,
        2,
        7,
        3,
        6,
        0,
    ]
    assert pair_ids.tolist() == [9, 2, 7, 3, 6, 0] and pair_ids.data_ptr() == arguments[10:].data_ptr()
    assert (num_regions, num_pairs) == (2, 3) and kwargs["grid"] == (3, 2, 1)
    assert kwargs["UNIT"] == triton_copy.tl.int64 and kwargs["ALIGN"] == 8
