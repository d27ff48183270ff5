"""The capability probe on releases outside the table: refused naming what is missing, or
run with an "untested release" warning. The release is faked on the real vLLM classes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib

from tests.sched.test_plugin import expected_patches
from vllm_bidkv import cli, patches
from vllm_bidkv.patches.capabilities import UnsupportedVLLMError, ci_facts, ci_status, probe, release_tuple

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


def test_shipped_ci_facts_are_the_rows_ci_runs() -> None:
    """vllm_bidkv/compat.json (what doctor reads) comes from a matrix run of today's releases.toml."""
    config = tomllib.loads((REPO / "ci" / "releases.toml").read_text())
    ci_runs = {
        (r["package"], r["version"], "source_patch" in r)
        for r in config["release"]
        if r["tiers"] != ["refused"]
    }
    shipped = {(r["package"], r["version"], r["source_patch"]) for r in ci_facts()["rows"]}
    assert shipped == ci_runs


def test_readme_states_what_the_last_matrix_run_passed() -> None:
    """docs/SUPPORTED.txt (ci/matrix.py) lists the releases whose every row passed; the README
    repeats it and names no release without a passing row in the shipped facts."""
    supported = (REPO / "docs" / "SUPPORTED.txt").read_text().strip()
    assert supported in (REPO / "README.md").read_text().splitlines()
    passed = supported.split("Scheduler-level tests on ", 1)[1].split(" and ", 1)[0].split(", ")
    assert set(passed) <= {r["version"] for r in ci_facts()["rows"] if r["passed"]}


# Runs doctor three times in one process: on the installed vLLM, and with its version set to a
# release with a passing row and to one between two rows (the classes stay the real ones).
DOCTOR_DRIVER = """
import contextlib, io, json, sys, vllm
from vllm_bidkv import cli
from vllm_bidkv.patches.capabilities import probe
stdout = io.StringIO()
with contextlib.redirect_stdout(stdout):
    status = cli.main(["doctor", "--json"])
out = {"module": cli.__file__, "status": status, "real": json.loads(stdout.getvalue())}
for name, version in (("inside", sys.argv[1]), ("outside", sys.argv[2])):
    vllm.__version__ = version
    probe.cache_clear()
    out[name] = cli.doctor_report()
print(json.dumps(out, default=str))
"""


def test_doctor_from_an_installed_wheel_reports_tested_and_untested(tmp_path: Path) -> None:
    """A pip-installed wheel has no docs/: doctor answers from the facts the package ships."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "vllm_bidkv", src / "vllm_bidkv", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path, src], check=True)
    (wheel,) = tmp_path.glob("vllm_bidkv-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", site, wheel], check=True)

    facts = ci_facts()
    patched = probe().vllm_binds_context  # a source-patched vLLM is tested only by a patched row
    tested = sorted({r["version"] for r in facts["rows"] if r["passed"]}, key=release_tuple)
    inside = next(v for v in tested if ci_status(v, patched)["status"] == "tested")
    outside = ".".join(inside.split(".")[:2]) + ".99"  # no row: after `inside`, before the next minor
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])
    proc = subprocess.run(
        [sys.executable, "-c", DOCTOR_DRIVER, inside, outside],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["module"].startswith(str(site)), "doctor must come from the installed wheel"

    real = probe()
    assert out["status"] == 0 and out["real"]["supported"] is True
    assert out["real"]["patches"] == expected_patches()
    assert out["real"]["capabilities"] == json.loads(json.dumps(real.as_dict()))
    assert out["real"]["ci"] == json.loads(json.dumps(ci_status(real.vllm_version, real.vllm_binds_context)))
    assert out["inside"]["tested"] is True and out["inside"]["ci"]["status"] == "tested"
    assert out["inside"]["ci"]["row"]["version"] == inside
    assert (
        f"passed {', '.join(out['inside']['ci']['row']['tiers'])} on {facts['date']}"
        in out["inside"]["verdict"]
    )
    assert f"at commit {facts['commit']}" in out["inside"]["verdict"]
    assert out["outside"]["tested"] is False
    assert out["outside"]["ci"] == {
        "status": "untested",
        "nearest_below": inside,
        "nearest_above": next((v for v in tested if release_tuple(v) > release_tuple(outside)), None),
        "date": facts["date"],
        "commit": facts["commit"],
    }
    patch = " + source patch" if patched else ""
    assert f"untested release {outside}{patch}; nearest tested: {inside} below" in out["outside"]["verdict"]


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
