"""Some configs of a tournament section run again, every (rate, run), the rest kept (session 22).

Usage: PYTHONPATH=.:bench python docs/results/study-26/rerun_configs.py <results dir> <processes> <section>
       <config,config,...> <why>

For a simulator change that cannot move the configs left out (the link model moves only
configs that copy: not ``stock``, not ``bidkv``, not ``oracle``, whose copies take no time).
The simulator is deterministic (virtual time), so a kept record is what a full rerun gives;
the caller checks that on a section cheap enough to rerun whole. The named configs run at
the rates and seeds of the section's records (the capacity probe is not run again: stock's
calibration is recorded; a section at fixed rates has none), in ``processes`` worker
processes; their records replace the old ones, every distance (``*_vs_unbounded``,
``distance_to_ideal``, ``distance_to_oracle``) is computed again over the merged records, and
the section's meta records what was rerun and why.
"""

import multiprocessing
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vllm_bidkv_bench import report
from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.presets import get_preset
from vllm_bidkv_bench.resultsdoc import SECTIONS
from vllm_bidkv_bench.runner import (
    Matrix,
    _sim_record,
    add_ideal_distance,
    add_oracle_distance,
    add_unbounded_distance,
)

_matrix: Matrix | None = None
_workloads: dict[tuple[float | str, int], Any] = {}


def _start(matrix: Matrix) -> None:
    global _matrix
    _matrix = matrix
    _workloads.update({(rate, run): w for rate, run, w in matrix.workloads()})


def _run(job: tuple[float | str, int, str]) -> dict[str, Any]:
    rate, run, name = job
    assert _matrix is not None
    return _sim_record(_matrix, _workloads[(rate, run)], CONFIGS[name], rate, run, False)


def rerun(results: Path, processes: int, name: str, configs: list[str], why: str) -> None:
    section = next(s for s in SECTIONS if s.name == name)
    path = results / f"{name}.json"
    records, meta = report.read_json(path)
    calibration = next((r["calibration"] for r in records if "calibration" in r), None)  # None: fixed rates
    runs = 1 + max(r["run"] for r in records)
    preset = get_preset(section.preset)
    matrix = Matrix(
        "sim",
        replace(preset, runs=runs),
        [CONFIGS[c] for c in configs],
        list(preset.rates),
        runs,
        seed=min(r["seed"] for r in records),
        loads=preset.loads,
        calibration=calibration,
    )
    jobs = sorted({(r["rate"], r["run"]) for r in records}, key=lambda j: (str(j[0]), j[1]))
    started = time.monotonic()
    with multiprocessing.Pool(processes, initializer=_start, initargs=(matrix,)) as pool:
        fresh = pool.map(_run, [(rate, run, c) for rate, run in jobs for c in configs], chunksize=1)
    for record in fresh if calibration is not None else ():
        record["calibration"] = calibration
        record["load"] = calibration["loads"][calibration["rates"].index(record["rate"])]
    kept = [r for r in records if r["config"] not in configs]
    for r in kept:  # computed again below, against the new records
        for key in [k for k in r if k.startswith("distance_to_") or "_vs_" in k]:
            del r[key]
    merged = [*kept, *fresh]
    add_unbounded_distance(merged)
    add_ideal_distance(merged)
    add_oracle_distance(merged)
    order = {c: i for i, c in enumerate(section.configs or preset.configs)}
    merged.sort(key=lambda r: (str(r["rate"]), r["run"], order.get(r["config"], len(order))))
    elapsed = time.monotonic() - started
    meta = {**meta, "preset": asdict(replace(preset, runs=runs))}
    meta.setdefault("reruns", []).append(
        {"configs": configs, "why": why, "processes": processes, "elapsed_s": round(elapsed, 1)}
    )
    report.write_json(merged, path, meta)
    report.write_csv(merged, results / f"{name}.csv")
    print(f"{name}: {len(fresh)} records rerun in {elapsed / 60:.1f} min", flush=True)


if __name__ == "__main__":
    out, n, section_name, names, reason = sys.argv[1:6]
    rerun(Path(out), int(n), section_name, names.split(","), reason)
