"""Seeds 1..N-1 added to a tournament section recorded with seed 0 (session 18).

Usage: PYTHONPATH=.:bench python docs/results/study-26/more_seeds.py <results dir> <runs> <section>...

What ``vllm-bidkv bench report --only <section>`` gives with the preset's ``runs`` (3), without
re-running seed 0: the simulator is deterministic (virtual time), so run r of a rate is workload
seed r at the rates seed 0's capacity probe measured (the probe runs on seed 0 either way). The
section's records gain runs 1..runs-1 of every (rate, config) and its meta the elapsed time; the
CSV is rewritten beside it.
"""

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from vllm_bidkv_bench import report
from vllm_bidkv_bench.configs import parse_configs
from vllm_bidkv_bench.presets import get_preset
from vllm_bidkv_bench.resultsdoc import SECTIONS
from vllm_bidkv_bench.runner import Matrix, run_matrix


def add_seeds(results: Path, runs: int, name: str) -> None:
    section = next(s for s in SECTIONS if s.name == name)
    path = results / f"{name}.json"
    records, meta = report.read_json(path)
    have = {r["run"] for r in records}
    assert have == {0}, f"{name}: expected seed 0 only, found runs {sorted(have)}"
    preset = get_preset(section.preset)
    calibration = next(r["calibration"] for r in records if "calibration" in r)
    matrix = Matrix(
        "sim",
        replace(preset, runs=runs - 1),
        parse_configs(list(section.configs or preset.configs), with_unbounded=preset.with_unbounded),
        list(preset.rates),
        runs - 1,
        seed=1,
        loads=preset.loads,
        calibration=calibration,
    )
    started = time.monotonic()
    added = run_matrix(matrix, progress=False)
    for r in added:
        r["run"] += 1
    meta = {**meta, "preset": asdict(replace(preset, runs=runs))}
    meta["elapsed_s"] = meta.get("elapsed_s", 0.0) + time.monotonic() - started
    meta["seeds_added"] = (
        f"runs 1-{runs - 1} added by docs/results/study-26/more_seeds.py to seed 0's records"
    )
    merged = sorted([*records, *added], key=lambda r: (str(r["rate"]), r["run"]))
    report.write_json(merged, path, meta)
    report.write_csv(merged, results / f"{name}.csv")
    print(f"{name}: {len(added)} records added in {(time.monotonic() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    out, n = Path(sys.argv[1]), int(sys.argv[2])
    for section_name in sys.argv[3:]:
        add_seeds(out, n, section_name)
