"""The copy benchmark (``vllm_bidkv_bench.copy``): output format, arguments, and what importing it
and the kernels does not import (triton; vLLM and the CLI's extras, absent on a bare GPU box).

Runs are on the CPU even where CUDA is available (the CUDA sweep is ``scripts/gpu_check.sh``'s)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_bidkv_bench import copy as copy_bench

pytestmark = pytest.mark.kernels


def test_run_copy_bench_writes_results_and_machine(tmp_path: Path) -> None:
    json_path = tmp_path / "copy.json"
    report = copy_bench.run_copy_bench(
        str(json_path),
        block_counts=[4],
        block_sizes_bytes=[4096],
        layers=2,
        repeats=2,
        device="cpu",
        verbose=False,
    )
    assert json.loads(json_path.read_text()) == report
    rows = report["results"]
    assert [(row["ids"], row["direction"]) for row in rows] == [
        ("tier", "store"),
        ("tier", "load"),
        ("random", "store"),
        ("random", "load"),
    ]
    for row in rows:
        assert row["backend"] == "torch" and row["blocks"] == 4 and row["block_bytes"] == 4096
        assert row["gbps"] > 0 and row["ratio_to_memcpy"] > 0 and row["memcpy_gbps"] > 0
    assert report["machine"]["torch"] and report["machine"]["device"] == "cpu"


@pytest.mark.parametrize("direction", ["store", "load"])
def test_tier_ids_are_random_cache_ids_and_one_run_of_slots(direction: str) -> None:
    src_ids, dst_ids = copy_bench._ids("tier", direction, 64)
    cache_ids, slots = (dst_ids, src_ids) if direction == "load" else (src_ids, dst_ids)
    assert slots == list(range(slots[0], slots[0] + 64)) and 0 <= slots[0] <= 64
    assert sorted(cache_ids) == list(range(0, 128, 2))
    random_sides = {tuple(sorted(ids)) for ids in copy_bench._ids("random", direction, 64)}
    assert random_sides == {tuple(range(0, 128, 2)), tuple(range(1, 128, 2))}, "no two ids adjacent"


def test_cli_arguments_reach_the_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    copy_bench.add_cli_args(parser)
    json_path = tmp_path / "copy.json"
    args = parser.parse_args(
        ["--json", str(json_path), "--blocks", "2", "--block-kib", "4", "--layers", "1", "--repeats", "1"]
        + ["--ids", "random", "--device", "cpu"]
    )
    assert copy_bench.main(args) == 0
    assert "ratio" in capsys.readouterr().out
    rows = json.loads(json_path.read_text())["results"]
    assert [(row["blocks"], row["ids"], row["direction"]) for row in rows] == [
        (2, "random", "store"),
        (2, "random", "load"),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--blocks", "0"], "argument --blocks: 0 is not >= 1"),
        (["--layers", "x"], "argument --layers: 'x' is not an integer"),
        (["--backends", "cuda"], "argument --backends: invalid choice: 'cuda'"),
        (["--device", "gpu"], "argument --device: Expected one of cpu, cuda"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    copy_bench.add_cli_args(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_importing_and_copying_on_cpu_does_not_import_triton() -> None:
    code = (
        "import sys, torch\n"
        "from vllm_bidkv.kernels import block_views, copy_blocks\n"
        "views = block_views(torch.zeros(5, 4, 8), 5)\n"
        "copy_blocks(views, views, [0], [1])\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_copy_bench_and_kernels_import_without_vllm_or_the_cli_extras() -> None:
    """``python -m vllm_bidkv_bench.copy`` runs on a GPU box with torch and triton only."""
    code = (
        "import sys\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('vllm', 'rich', 'prometheus_client'):\n"
        "            raise ImportError(f'{name} is absent')\n"
        "sys.meta_path.insert(0, Absent())\n"
        "import runpy\n"
        "sys.argv = ['copy', '--help']\n"
        "try:\n"
        "    runpy.run_module('vllm_bidkv_bench.copy', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "import vllm_bidkv.kernels.triton_copy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--device" in done.stdout
