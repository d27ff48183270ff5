"""``vllm-bidkv top``: a live terminal view of vLLM servers' ``/metrics`` with BidKVConnector.

One column per server: the CPU tier's occupancy and transfers in flight (the
``vllm:bidkv_*`` gauges), prefix-cache hit rates (vLLM's GPU cache and the
connector's external hits), tokens loaded from the tier vs recomputed after
preemptions, preemptions, and bytes/s each way (the difference of two samples).
Rendering is rich's (``Table``, ``Live``); ``--once`` prints one plain-text table
for scripts. Parsing is ``prometheus_client.parser``. No vLLM import.

A server that cannot be read keeps its column, showing why (``fetch``): down
(refused, unreachable, no answer), not HTTP (something else on that port),
restarting (it closed the connection mid-response), an HTTP error status, or
unreadable ``/metrics``.
"""

from __future__ import annotations

import http.client
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vllm_bidkv.counters import GAUGES


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {sample name: value summed over label sets} (``_total``, ``_sum``... kept).

    Histogram buckets are skipped. A malformed exposition raises ValueError.
    """
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    continue
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    except (ValueError, TypeError, IndexError) as err:
        raise ValueError(f"vllm-bidkv top: cannot parse /metrics: {err}") from err
    return values


def metrics_url(url: str) -> str:
    """``http://host:port`` (or a full ``.../metrics`` URL) → the metrics URL; ValueError naming --url."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"vllm-bidkv top: --url {url!r} must look like http://HOST:PORT")
    path = parsed.path.rstrip("/")
    if not path.endswith("/metrics"):
        path += "/metrics"
    return urllib.parse.urlunparse(parsed._replace(path=path))


@dataclass
class Snapshot:
    """One server's metrics at one time (``error`` set instead when it could not be read)."""

    url: str
    time: float
    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def fetch(url: str, timeout: float = 5.0) -> Snapshot:
    """One sample of ``url``'s metrics, or a Snapshot whose ``error`` says why there is none."""
    now = time.monotonic()
    try:
        with urllib.request.urlopen(metrics_url(url), timeout=timeout) as response:
            return Snapshot(url, now, parse_metrics(response.read().decode()))
    except (OSError, http.client.HTTPException, ValueError) as err:
        return Snapshot(url, now, error=_server_state(err))


def _server_state(err: BaseException) -> str:
    """Why a server could not be read, for its column (see the module doc)."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):  # urllib wraps errors of connecting and sending
        return _server_state(err.reason) if isinstance(err.reason, BaseException) else f"down ({err.reason})"
    if isinstance(err, ConnectionRefusedError):
        return "down (connection refused)"
    # RemoteDisconnected (nothing came back) is a BadStatusLine too: test it first.
    if isinstance(err, http.client.IncompleteRead | http.client.RemoteDisconnected | ConnectionError):
        return "restarting (closed the connection mid-response)"
    if isinstance(err, http.client.BadStatusLine):
        return f"not HTTP (answered {err.line[:40]!r})"
    if isinstance(err, http.client.HTTPException):
        return f"not HTTP ({type(err).__name__}: {str(err)[:40]})"
    if isinstance(err, TimeoutError):
        return "down (no answer in time)"
    if isinstance(err, OSError):
        return f"down ({err.strerror or err})"
    if isinstance(err, UnicodeDecodeError):
        return "bad /metrics (not UTF-8 text)"
    return f"bad /metrics ({str(err).removeprefix('vllm-bidkv top: cannot parse /metrics: ')})"


def _ratio(num: float, den: float) -> str:
    return f"{100.0 * num / den:.1f}%" if den > 0 else "-"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _rate(cur: Snapshot, prev: Snapshot | None, name: str) -> str:
    if prev is None or prev.error or cur.error or cur.time <= prev.time:
        return "-"
    delta = cur.values.get(name, 0.0) - prev.values.get(name, 0.0)
    return _bytes(max(0.0, delta) / (cur.time - prev.time)) + "/s"


ROWS: tuple[str, ...] = (
    "tier used",
    "tier entries",
    "pinned entries",
    "stores in flight",
    "loads in flight",
    "tracked requests",
    "requests running / waiting",
    "GPU KV usage",
    "GPU prefix hit rate",
    "CPU tier hit rate (new requests)",
    "tokens loaded / recomputed",
    "preemptions (vLLM / policy)",
    "load errors",
    "stored GPU→CPU",
    "loaded CPU→GPU",
    "disk tier used",
    "disk blocks written / read / dropped",
)


def summarize(cur: Snapshot, prev: Snapshot | None = None) -> dict[str, str]:
    """The view's rows for one server (``ROWS`` order); rates need ``prev``."""
    if cur.error is not None:
        return dict.fromkeys(ROWS, "-") | {ROWS[0]: f"error: {cur.error}"}
    v = cur.values

    def g(name: str) -> float:
        return v.get(name, 0.0)

    def n(name: str) -> str:
        return f"{g(name):.0f}"

    has_bidkv = f"vllm:bidkv_{next(iter(GAUGES))}" in v
    cap = g("vllm:bidkv_tier_capacity_bytes")
    used = g("vllm:bidkv_tier_used_bytes")
    disk_cap, disk_used = g("vllm:bidkv_disk_capacity_bytes"), g("vllm:bidkv_disk_used_bytes")
    rows = {
        "tier used": f"{_bytes(used)} / {_bytes(cap)} ({_ratio(used, cap)})"
        if has_bidkv
        else "no bidkv gauges",
        "tier entries": n("vllm:bidkv_tier_entries"),
        "pinned entries": n("vllm:bidkv_tier_pinned_entries"),
        "stores in flight": n("vllm:bidkv_stores_in_flight"),
        "loads in flight": n("vllm:bidkv_loads_in_flight"),
        "tracked requests": n("vllm:bidkv_tracked_requests"),
        "requests running / waiting": f"{n('vllm:num_requests_running')} / {n('vllm:num_requests_waiting')}",
        "GPU KV usage": f"{100.0 * g('vllm:kv_cache_usage_perc'):.1f}%",
        "GPU prefix hit rate": _ratio(
            g("vllm:prefix_cache_hits_total"), g("vllm:prefix_cache_queries_total")
        ),
        "CPU tier hit rate (new requests)": _ratio(
            g("vllm:external_prefix_cache_hits_total"), g("vllm:external_prefix_cache_queries_total")
        ),
        "tokens loaded / recomputed": f"{n('vllm:bidkv_tokens_loaded_total')} / "
        f"{n('vllm:bidkv_recomputed_tokens_total')}",
        "preemptions (vLLM / policy)": f"{n('vllm:num_preemptions_total')} / {n('vllm:bidkv_preemptions_total')}",
        "load errors": n("vllm:bidkv_load_errors_total"),
        "stored GPU→CPU": f"{_bytes(g('vllm:bidkv_bytes_stored_total'))} ({_rate(cur, prev, 'vllm:bidkv_bytes_stored_total')})",
        "loaded CPU→GPU": f"{_bytes(g('vllm:bidkv_bytes_loaded_total'))} ({_rate(cur, prev, 'vllm:bidkv_bytes_loaded_total')})",
        "disk tier used": f"{_bytes(disk_used)} / {_bytes(disk_cap)} ({_ratio(disk_used, disk_cap)})"
        if disk_cap
        else "no disk tier",
        "disk blocks written / read / dropped": f"{n('vllm:bidkv_disk_blocks_written_total')} / "
        f"{n('vllm:bidkv_disk_blocks_read_total')} / {n('vllm:bidkv_disk_store_drops_total')}",
    }
    return rows


def render(
    snapshots: Sequence[Snapshot], previous: Sequence[Snapshot | None] | None = None, *, plain: bool = False
) -> Table:
    """A rich Table: a row per ``ROWS`` entry, a column per server (``plain``: ASCII borders)."""
    prev = list(previous) if previous is not None else [None] * len(snapshots)
    table = Table(title="vllm-bidkv top", title_justify="left", box=box.ASCII if plain else box.HEAVY_HEAD)
    table.add_column("")
    summaries = []
    for snap, before in zip(snapshots, prev, strict=True):
        table.add_column(Text(snap.url), justify="right")
        summaries.append(summarize(snap, before))
    for row in ROWS:
        # Text, not markup: a URL or what a server answered may contain [brackets].
        table.add_row(row, *(Text(s[row]) for s in summaries))
    return table


def run_top(
    urls: Sequence[str],
    *,
    once: bool = False,
    interval: float = 2.0,
    iterations: int | None = None,
    console: Console | None = None,
    fetcher: Callable[[str], Snapshot] = fetch,
) -> int:
    """``--once``: two samples ``interval`` apart (for the rates), one plain table; else a Live view.

    Returns 0, or 1 if ``--once`` could read no server. A server that cannot be read shows why
    in its column, and the view goes on.
    """
    for url in urls:
        metrics_url(url)  # bad --url: ValueError now, not a column of errors
    if not (math.isfinite(interval) and interval > 0):
        raise ValueError(
            f"vllm-bidkv top: --interval {interval} is invalid; expected a finite number of seconds > 0"
        )
    if once:
        console = console or Console(color_system=None, force_terminal=False, width=120, soft_wrap=False)
        first = [fetcher(u) for u in urls]
        time.sleep(interval)
        second = [fetcher(u) for u in urls]
        console.print(render(second, first, plain=True))
        return 0 if any(s.error is None for s in second) else 1
    console = console or Console()
    prev: list[Snapshot | None] = [None] * len(urls)
    count = 0
    with Live(render([fetcher(u) for u in urls]), console=console, refresh_per_second=4) as live:
        while iterations is None or count < iterations:
            cur = [fetcher(u) for u in urls]
            live.update(render(cur, prev))
            prev = list(cur)
            count += 1
            time.sleep(interval)
    return 0
