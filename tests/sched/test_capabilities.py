"""The capability probe on releases outside the table: refused naming what is missing, or
run with an "untested release" warning. The release is faked on the real vLLM classes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib

from vllm_bidkv import cli, patches
from vllm_bidkv.patches.capabilities import TESTED_RELEASES, UnsupportedVLLMError, probe

pytestmark = pytest.mark.sched

FAKE_VERSION = "0.99.0"
CONNECTOR = {
    "kv_connector": "BidKVConnector",
    "kv_connector_module_path": "vllm_bidkv",
    "kv_role": "kv_both",
    "kv_connector_extra_config": {"offload_mode": "off"},
}


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    probe.cache_clear()
    yield
    patches.revert()  # doctor applies the patches when the release is supported
    probe.cache_clear()


@pytest.fixture
def unknown_release(monkeypatch: pytest.MonkeyPatch, fresh_probe: None) -> None:
    import vllm

    monkeypatch.setattr(vllm, "__version__", FAKE_VERSION)


REPO = Path(__file__).parents[2]


def test_tested_releases_are_the_ones_ci_runs() -> None:
    config = tomllib.loads((REPO / "ci" / "releases.toml").read_text())
    ci_runs = {r["version"] for r in config["release"] if r["tiers"] != ["refused"]}
    assert set(TESTED_RELEASES) == ci_runs


def test_readme_states_what_the_last_matrix_run_passed() -> None:
    """docs/SUPPORTED.txt (ci/matrix.py) lists the releases whose every row passed; the README
    repeats it and names no release the matrix does not run."""
    supported = (REPO / "docs" / "SUPPORTED.txt").read_text().strip()
    assert supported in (REPO / "README.md").read_text().splitlines()
    passed = supported.split("Scheduler-level tests on ", 1)[1].split(" and ", 1)[0].split(", ")
    assert set(passed) <= set(TESTED_RELEASES)


def test_untested_release_with_every_capability_runs_with_a_warning(
    unknown_release: None,
    make_scheduler: Any,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caps = probe()
    assert caps.supported and not caps.tested and caps.vllm_version == FAKE_VERSION
    assert cli.main(["doctor"]) == 0
    assert f"supported (untested release {FAKE_VERSION}" in capsys.readouterr().out
    with caplog.at_level(logging.WARNING, logger="vllm_bidkv"):
        scheduler = make_scheduler(kv_transfer_config=CONNECTOR)
    assert scheduler.connector is not None
    assert any(f"untested release {FAKE_VERSION}" in r.getMessage() for r in caplog.records)


def test_release_missing_a_capability_is_refused_by_doctor_and_connector(
    unknown_release: None,
    monkeypatch: pytest.MonkeyPatch,
    make_scheduler: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    monkeypatch.delattr(KVCacheManager, "allocate_slots")  # as if a release renamed it
    report = cli.doctor_report()
    assert report["supported"] is False and report["missing"] == ["allocate_slots"]
    assert report["verdict"] == f"unsupported: vLLM {FAKE_VERSION} lacks allocate_slots"
    assert report["patches"] == []
    assert cli.main(["doctor"]) == 1
    assert report["verdict"] in capsys.readouterr().out
    with pytest.raises(UnsupportedVLLMError) as refused:
        make_scheduler(kv_transfer_config=CONNECTOR)
    assert str(refused.value) == f"vllm-bidkv: {report['verdict']}"


def test_probe_sees_vllm_through_the_runtime_bind_hook(fresh_probe: None) -> None:
    before = probe()
    patches.apply()
    probe.cache_clear()
    assert probe() == before


def test_doctor_reports_a_bad_config_value_and_fails(
    fresh_probe: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BIDKV_CPU_BYTES", "1PiB")
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "config: vllm-bidkv config: cpu_bytes='1PiB' is invalid; expected" in out
    assert "patches applied: none" in out  # a config vLLM would refuse applies nothing
