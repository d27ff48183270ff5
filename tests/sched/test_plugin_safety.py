"""The plugin never breaks vLLM: vLLM's plugin loader calls ``register()`` without a try in every
process, connector or not. A bad ``BIDKV_*`` value, a release missing a capability or a vLLM
installed without its source is one log line and an untouched vLLM; a process that configures the
connector gets the connector's clear refusal. ``doctor`` says what it ignored and could not probe."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.sched.test_plugin import expected_patches
from vllm_bidkv import cli, patches
from vllm_bidkv.patches import capabilities
from vllm_bidkv.patches.capabilities import Capabilities, UnsupportedVLLMError, probe
from vllm_bidkv.plugin import CONNECTOR_NAME

pytestmark = pytest.mark.sched

BY_NAME = {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both"}


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    probe.cache_clear()
    yield
    patches.revert()
    probe.cache_clear()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith(("BIDKV_", "VLLM_BIDKV_")):
            monkeypatch.delenv(name)


@pytest.fixture
def load_plugins(monkeypatch: pytest.MonkeyPatch, fresh_probe: None, clean_env: None) -> Callable[[], None]:
    """vLLM's own loader, as in a fresh process: plugins not loaded yet, our name not registered."""
    import vllm.plugins
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    registry = {k: v for k, v in KVConnectorFactory._registry.items() if k != CONNECTOR_NAME}
    monkeypatch.setattr(KVConnectorFactory, "_registry", registry)
    monkeypatch.setenv("VLLM_PLUGINS", "vllm_bidkv")
    assert patches.applied() == []

    def load() -> None:
        monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
        vllm.plugins.load_general_plugins()

    return load


def bidkv_problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vllm_bidkv" and r.levelno >= logging.WARNING]


def scheduler_init() -> Any:
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler.__init__


def test_a_bad_config_value_is_one_line_and_vllm_runs_stock(
    load_plugins: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    make_scheduler: Any,
) -> None:
    monkeypatch.setenv("BIDKV_CPU_BYTES", "lots")
    init = scheduler_init()
    with caplog.at_level(logging.INFO, logger="vllm_bidkv"):
        load_plugins()  # raised ValueError out of vLLM's loader: `vllm serve` of any model failed
    assert scheduler_init() is init and patches.applied() == []
    (line,) = bidkv_problems(caplog)
    assert line.startswith("vllm-bidkv config: cpu_bytes='lots' is invalid; expected a whole number of bytes")
    assert "applied no patch" in line and "\n" not in line
    assert make_scheduler().connector is None  # a process without the connector: stock vLLM
    with pytest.raises(ValueError, match=r"^vllm-bidkv config: cpu_bytes='lots' is invalid; expected"):
        make_scheduler(kv_transfer_config=BY_NAME)  # the name is registered: our refusal, not vLLM's


def test_a_release_missing_a_capability_is_one_line_and_vllm_runs_stock(
    load_plugins: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    make_scheduler: Any,
) -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    monkeypatch.delattr(KVCacheManager, "allocate_slots")  # as if a release renamed it
    init = scheduler_init()
    with caplog.at_level(logging.INFO, logger="vllm_bidkv"):
        load_plugins()
    assert scheduler_init() is init and patches.applied() == []
    (line,) = bidkv_problems(caplog)
    assert line.startswith(f"vllm-bidkv: unsupported: vLLM {probe().vllm_version} lacks allocate_slots")
    with pytest.raises(UnsupportedVLLMError, match="lacks allocate_slots"):
        make_scheduler(kv_transfer_config=BY_NAME)


def test_an_unexpected_error_is_one_line_naming_its_type(
    load_plugins: Callable[[], None], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_probe() -> None:
        raise KeyError("Scheduler")

    monkeypatch.setattr(capabilities, "probe", broken_probe)
    with caplog.at_level(logging.INFO, logger="vllm_bidkv"):
        load_plugins()
    assert bidkv_problems(caplog) == [
        "vllm-bidkv: KeyError: 'Scheduler' -- vllm-bidkv applied no patch in this process; "
        "BidKVConnector, if configured, refuses to start"
    ]
    assert patches.applied() == []


def no_getsource(obj: object) -> str:
    raise OSError("could not get source code")  # what inspect says without a .py file


def kv_connector_output(scheduler_output: Any, wait_for_save: bool = True) -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()


@pytest.fixture
def no_source(monkeypatch: pytest.MonkeyPatch, fresh_probe: None) -> dict[str, Any]:
    """vLLM as installed from compiled files only: no function's source can be read. Returns
    the capabilities probed with the source, for comparison."""
    real = probe().as_dict()
    probe.cache_clear()
    monkeypatch.setattr(inspect, "getsource", no_getsource)
    return real


def test_probe_without_source_reads_compiled_code_and_names_what_it_cannot(
    no_source: dict[str, Any], load_plugins: Callable[[], None], caplog: pytest.LogCaptureFixture
) -> None:
    caps = probe()  # raised OSError
    assert caps.unknown == ("free_blocks_prepends_unhashed",)
    assert caps.free_blocks_prepends_unhashed is False  # unknown: taken as absent
    assert set(Capabilities.REQUIRED) - {
        "connector_base_v1",
        "connector_factory_register",
        "connector_prom_metrics",
    } <= set(caps.from_compiled_code)
    # Every other capability reads the same from compiled code as from the source.
    found = caps.as_dict()
    differs = {k for k in found if found[k] != no_source[k]}
    assert differs - {"free_blocks_prepends_unhashed", "from_compiled_code", "unknown"} == set()
    assert caps.supported
    assert "could not probe free_blocks_prepends_unhashed: vLLM's source is not installed" in caps.verdict()
    with caplog.at_level(logging.INFO, logger="vllm_bidkv"):
        load_plugins()  # raised OSError out of vLLM's loader
    assert bidkv_problems(caplog) == []
    assert patches.applied() == expected_patches()


def test_doctor_without_source_says_what_it_could_not_probe(
    no_source: dict[str, Any], clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "could not probe (taken as absent): free_blocks_prepends_unhashed" in out
    assert (
        "vLLM's source is not installed; read from its compiled code instead: scheduler_running_list" in out
    )
    assert f"  {'free_blocks_prepends_unhashed':34s} unknown\n" in out
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["capabilities"]["unknown"] == ["free_blocks_prepends_unhashed"]


def test_code_fallbacks_read_the_older_shapes() -> None:
    """Without source, the probe reads compiled code: the shapes of releases before this one
    (a keyword argument, a tuple annotation, a loop variable) are visible there too."""
    from vllm_bidkv.patches.capabilities import _touch_takes_group_tuple
    from vllm_bidkv.patches.code_reading import Reading, code_names

    def no_forward_up_to_0_30(scheduler_output: Any) -> Any:
        with kv_connector_output(scheduler_output, wait_for_save=False) as kv:
            pass
        return kv

    def touch_up_to_0_13(self: Any, blocks: tuple[list[Any], ...]) -> None:
        for blocks_per_group in blocks:
            del blocks_per_group

    def touch_later(self: Any, blocks: list[Any]) -> None:
        for block in blocks:
            del block

    assert "wait_for_save" in (code_names(no_forward_up_to_0_30) or set())
    read = Reading()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inspect, "getsource", no_getsource)
        assert _touch_takes_group_tuple(read, touch_up_to_0_13) is True
        assert _touch_takes_group_tuple(read, touch_later) is False
    assert list(read.from_compiled_code) == ["touch_takes_group_tuple"] and not read.unknown
    assert code_names(print) is None  # a builtin: nothing to read, the capability is unknown


def test_a_required_capability_that_cannot_be_probed_is_refused_clearly(fresh_probe: None) -> None:
    caps = dataclasses.replace(probe(), allocate_slots=False, unknown=("allocate_slots",))
    assert not caps.supported
    assert caps.verdict() == (
        f"unsupported: vLLM {caps.vllm_version} cannot probe allocate_slots (vLLM's source is not "
        "installed and its compiled code does not tell; taken as absent)"
    )


@pytest.mark.parametrize(
    ("env", "state", "status"),
    [
        ({}, "off", 0),
        (
            {"VLLM_BIDKV_FAULTS": '{"load_every": 2}'},
            "refused: VLLM_BIDKV_FAULTS is set without the opt-in VLLM_BIDKV_TEST_HOOKS=1",
            1,
        ),
        (
            {"VLLM_BIDKV_FAULTS": '{"load_every": 2}', "VLLM_BIDKV_TEST_HOOKS": "1"},
            'ON (VLLM_BIDKV_FAULTS={"load_every": 2})',
            0,
        ),
        (
            {"VLLM_BIDKV_FAULTS": "{", "VLLM_BIDKV_TEST_HOOKS": "1"},
            "refused: vllm-bidkv: VLLM_BIDKV_FAULTS is not JSON",
            1,
        ),
        ({"VLLM_BIDKV_TEST_HOOKS": "1"}, "off", 0),
    ],
)
def test_doctor_and_config_show_ignored_variables_and_the_fault_hook(
    env: dict[str, str],
    state: str,
    status: int,
    clean_env: None,
    fresh_probe: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in {**env, "BIDKV_STRATEGY": "bidkv", "BIDKV_SEED": "3"}.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["doctor", "--json"]) == status
    report = json.loads(capsys.readouterr().out)
    assert report["ignored_env"] == ["BIDKV_STRATEGY"]
    assert report["fault_hook"].startswith(state)
    assert cli.main(["doctor"]) == status
    out = capsys.readouterr().out
    assert "ignored BIDKV_* variables (unknown names): BIDKV_STRATEGY\n" in out
    assert f"fault-injection test hook: {state}" in out
    assert cli.main(["config"]) == status
    assert f"fault-injection test hook: {state}" in capsys.readouterr().err


def test_the_hook_variables_share_the_prefix_doctor_looks_for() -> None:
    """Without a VLLM_BIDKV_* variable, doctor and config skip importing the worker module."""
    from vllm_bidkv.connectors.faults import FAULTS_ENV, TEST_HOOKS_ENV

    assert FAULTS_ENV.startswith("VLLM_BIDKV_") and TEST_HOOKS_ENV.startswith("VLLM_BIDKV_")
