"""Host memory for CUDA copies, without a GPU: the tier's page-locking and its release, whether
the Triton kernel may dereference a host view, and argument staging.

There is no GPU here, so the CUDA runtime and driver are replaced by fakes, each named FAKE in
its docstring: they answer as a GPU box would and record what was asked of them.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_bidkv.kernels import allocate_like, layout, release_pinned

pytestmark = pytest.mark.kernels

MAPPED = 3  # cudaHostRegisterPortable | cudaHostRegisterMapped


class FakeCudaRuntime:
    """FAKE ``torch.cuda.cudart()`` (no GPU here): records registrations instead of page-locking."""

    def __init__(self, register_error: int = 0) -> None:
        self.calls: list[tuple] = []
        self.register_error = register_error

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:
        self.calls.append(("register", pointer, size, flags))
        return self.register_error

    def cudaHostUnregister(self, pointer: int) -> int:
        self.calls.append(("unregister", pointer))
        return 0


class FakeDriver:
    """FAKE CUDA driver library (no GPU here): ``cuPointerGetAttribute`` answers a device pointer
    at ``shift`` bytes from the host pointer, or fails with ``status``."""

    def __init__(self, status: int = 0, shift: int = 0) -> None:
        self.status, self.shift = status, shift

    def cuPointerGetAttribute(self, out: ctypes._CArgObject, attribute: int, pointer: int) -> int:
        assert attribute == 3  # CU_POINTER_ATTRIBUTE_DEVICE_POINTER
        out._obj.value = pointer + self.shift
        return self.status


@pytest.fixture
def cudart(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCudaRuntime]:
    """The FAKE runtime in place of torch's, and every registration found mapped at its host
    address (what ``cuPointerGetAttribute`` answers on a GPU with unified addressing)."""
    fake = FakeCudaRuntime()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(layout, "_mapping_reason", lambda pointer: "")
    yield fake
    for call in fake.calls:  # while the fake is in place: the real runtime needs a GPU
        registration = layout._registrations.get(call[1]) if call[0] == "register" else None
        if registration is not None:
            registration.unregister()


def tier_views() -> list[torch.Tensor]:
    return [torch.zeros(3, 16, dtype=torch.uint8), torch.zeros(3, 8, dtype=torch.uint8)]


def test_pinned_tier_is_one_mapped_registration_released_once(cudart: FakeCudaRuntime) -> None:
    tier = allocate_like(tier_views(), 5, "cpu", pin_memory=True)
    base = tier[0].data_ptr()
    assert cudart.calls == [("register", base, 5 * (16 + 8), MAPPED)]
    assert layout.unaddressable_reason(tier[1]) == ""
    assert release_pinned(tier) == 1
    assert cudart.calls[1:] == [("unregister", base)]
    assert release_pinned(tier) == 0 and release_pinned(tier[1]) == 0, "release is idempotent"
    assert layout.unaddressable_reason(tier[0]) == "it is pageable host memory"
    tier[1].fill_(9)  # still valid memory, now pageable
    assert int(tier[1].sum()) == 9 * 5 * 8
    del tier
    gc.collect()
    assert len(cudart.calls) == 2, "freeing a released tier does not unregister it again"


def test_freeing_the_tier_unregisters_it(cudart: FakeCudaRuntime) -> None:
    tier = allocate_like(tier_views(), 4, "cpu", pin_memory=True)
    base = tier[0].data_ptr()
    last_view = tier[1]
    del tier
    gc.collect()
    assert cudart.calls == [("register", base, 4 * 24, MAPPED)], "a live view keeps it registered"
    del last_view
    gc.collect()
    assert cudart.calls[1:] == [("unregister", base)]
    assert base not in layout._registrations


def test_release_ignores_memory_it_did_not_register(cudart: FakeCudaRuntime) -> None:
    assert release_pinned([torch.zeros(4, dtype=torch.uint8)]) == 0
    assert cudart.calls == []


def test_failed_registration_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudaRuntime(register_error=1))
    with pytest.raises(RuntimeError, match="cudaHostRegister of 72 bytes failed: error 1"):
        allocate_like(tier_views(), 3, "cpu", pin_memory=True)


@pytest.mark.parametrize(
    ("driver", "reason"),
    [
        (lambda: FakeDriver(), ""),
        (
            lambda: FakeDriver(status=1),
            "not mapped into the device address space (cuPointerGetAttribute error 1)",
        ),
        (lambda: FakeDriver(shift=4096), "the device maps it at another address"),
    ],
    ids=["mapped-at-host-address", "not-mapped", "mapped-elsewhere"],
)
def test_mapping_reason_asks_the_driver_for_the_device_pointer(
    driver, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layout, "_cuda_driver", driver)
    got = layout._mapping_reason(0x7F0000001000)
    assert reason in got if reason else got == ""


def test_mapping_reason_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(layout, "_cuda_driver", missing)
    assert "CUDA driver library is not loadable" in layout._mapping_reason(4096)


@pytest.mark.parametrize("mapping", ["", "the device maps it at another address"], ids=["mapped", "unmapped"])
def test_triton_refuses_host_views_the_device_cannot_dereference(
    mapping: str, cudart: FakeCudaRuntime, triton_copy: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``unsupported_reason`` as on a GPU: the interpreter is switched off, a FAKE CUDA view (an
    object with a CUDA device; no GPU here) stands for the cache, and the registration's mapping
    is what the FAKE driver query answered when the tier was allocated."""
    monkeypatch.setattr(triton_copy, "is_interpreted", lambda: False)
    monkeypatch.setattr(layout, "_mapping_reason", lambda pointer: mapping)
    fake_cuda_view = SimpleNamespace(device=torch.device("cuda", 0))
    tier = allocate_like(tier_views(), 5, "cpu", pin_memory=True)
    reason = triton_copy.unsupported_reason([fake_cuda_view, *tier])
    if mapping:
        assert reason.startswith(f"the kernel cannot dereference a host view: {mapping} (")
        assert "allocate_like(pin_memory=True)" in reason
    else:
        assert reason == ""
    pageable = triton_copy.unsupported_reason([fake_cuda_view, torch.zeros(2, 8, dtype=torch.uint8)])
    assert "cannot dereference a host view: it is pageable host memory" in pageable


def test_stage_int64_concatenates_parts_in_order() -> None:
    parts = [[7, 2**40], np.array([3, -1], dtype=np.int32), torch.tensor([5]), np.array([], dtype=np.int64)]
    staged = layout.stage_int64(parts, torch.device("cpu"))
    assert staged.dtype == torch.int64 and staged.device.type == "cpu"
    assert staged.tolist() == [7, 2**40, 3, -1, 5]
