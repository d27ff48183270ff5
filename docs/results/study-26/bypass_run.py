"""cache-aware admission: sweep admission_max_bypass at load 0.8 (3 seeds), at the study's calibrated rate.

Run from the repository root:
`python docs/results/study-26/bypass_run.py h100-llama3-8b-chat-cpu1x OUT.json 4,8,32`
(`bypass.py` reads OUT as docs/results/study-26/<preset>-bypass.json).
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.presets import get_preset
from vllm_bidkv_bench.runner import Matrix, run_matrix

preset_name, out = sys.argv[1], sys.argv[2]
bounds = [int(b) for b in sys.argv[3].split(",")]
study = json.loads(Path(f"docs/results/study-26/{preset_name}.json").read_text())["results"]
calibration = next(r["calibration"] for r in study if "calibration" in r)
calibration = {**calibration, "loads": [0.8], "rates": [next(r["rate"] for r in study)]}
ours = CONFIGS["bidkv+offload"]
configs = [replace(ours, name=f"ca-{b}", connector_options=(("admission_max_bypass", b),)) for b in bounds]
matrix = Matrix(
    "sim",
    get_preset(preset_name),
    configs,
    [],
    3,
    admission="cache-aware",
    loads=(0.8,),
    calibration=calibration,
)
Path(out).write_text(json.dumps({"results": run_matrix(matrix, progress=False)}))
