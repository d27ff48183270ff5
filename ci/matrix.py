"""The vLLM release matrix: one environment per release in ci/releases.toml, its tiers, docs/COMPAT.md.

    .venv/bin/python ci/matrix.py [--jobs N] [--only VERSION ...] [--render-only]

Environments and downloads are cached under ``$BIDKV_CI_CACHE`` (default
``~/.cache/vllm-bidkv-ci``), outside the work tree because CI runs in a fresh clone on
the same machine. Each release's result (per tier: counts, seconds, failures; the
capability table; setup and test wall time) goes to ``<cache>/results.json``;
docs/COMPAT.md and docs/SUPPORTED.txt are rendered from it. Exit status 1 if any
listed release could not be installed or any of its tiers failed (or ran no test).
Every release's environment is built in the background while the first release (the
main .venv, nothing to install) runs its tests. With ``--jobs`` 2 (the default on two
cores) the main row runs beside the Scheduler-level rows, then the other engine rows; every
test process then computes on one OpenMP thread (``OMP_NUM_THREADS=1``).
The facts `vllm-bidkv doctor` needs ship in the package as ``vllm_bidkv/compat.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tomllib

REPO = Path(__file__).resolve().parent.parent
CI_DIR = REPO / "ci"
TIER_ORDER = ("unit", "sched", "engine", "kernels")
SUPPORTED_PREFIX = "Supported vLLM versions:"
# Installed into `venv` releases at the main .venv's versions, so every release runs the same tests.
TEST_TOOLS = ("pytest", "hypothesis", "matplotlib")
# Long enough for the slowest healthy run with margin; a hang must not eat CI's budget.
# The main row runs every engine test: ~20 min here.
TIMEOUT_S = {"full": 2700, "sched": 900}


@dataclasses.dataclass(frozen=True)
class Release:
    package: str
    version: str
    install: str
    tiers: tuple[str, ...]
    extra: tuple[str, ...] = ()
    uninstall: tuple[str, ...] = ()
    source_patch: str = ""
    engine_subset: str = ""
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.package}-{self.version}" + ("-patched" if self.source_patch else "")

    @property
    def label(self) -> str:
        return f"{self.package} {self.version}" + (" + source patch" if self.source_patch else "")

    @property
    def full(self) -> bool:
        return "engine" in self.tiers

    @property
    def marker_expression(self) -> str:
        """pytest's ``-m``: the tiers, the engine tier narrowed to its subset marker if any."""
        return " or ".join(
            f"({tier} and {self.engine_subset})" if tier == "engine" and self.engine_subset else tier
            for tier in self.tiers
        )

    def spec_hash(self) -> str:
        """Changes whenever the environment must be rebuilt."""
        spec = dataclasses.asdict(self)
        if self.source_patch:
            spec["patch_sha"] = hashlib.sha256((REPO / self.source_patch).read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: Path = CI_DIR / "releases.toml") -> tuple[list[Release], dict[str, Any]]:
    data = tomllib.loads(path.read_text())
    releases = [
        Release(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
        for entry in data["release"]
    ]
    return releases, data["floor"]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


# -- environments -----------------------------------------------------------------
@dataclasses.dataclass
class Env:
    python: str
    env: dict[str, str]


class SetupError(RuntimeError):
    pass


def _run(cmd: list[str], log: Path, **kwargs: Any) -> None:
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs)
    if proc.returncode != 0:
        raise SetupError(f"`{' '.join(cmd[:6])} ...` failed ({proc.returncode}); see {log}")


def _pip(python: str, command: str, *args: str) -> list[str]:
    progress = ["--progress-bar", "off"] if command in ("install", "download") else []
    return [python, "-m", "pip", command, "--disable-pip-version-check", *progress, *args]


def build_env(release: Release, cache: Path, log: Path) -> Env:
    base = dict(os.environ, PIP_CACHE_DIR=str(cache / "pip"))
    if release.install == "main":
        found = importlib.metadata.version(release.package)
        if found != release.version:
            raise SetupError(
                f"main .venv has {release.package} {found}, releases.toml says {release.version}"
            )
        return Env(sys.executable, base)
    root = cache / "envs" / release.key
    tools = (
        [f"{name}=={importlib.metadata.version(name)}" for name in TEST_TOOLS]
        if release.install == "venv"
        else []
    )
    spec = release.spec_hash() + "".join(f" {t}" for t in tools)
    stamp = root / ".ci-spec"
    fresh = not (stamp.exists() and stamp.read_text() == spec)
    if release.install == "venv":
        python = str(root / "bin" / "python")
        if fresh:
            shutil.rmtree(root, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(root)], log)
            _run(_pip(python, "install", f"{release.package}=={release.version}", *tools), log, env=base)
            if release.uninstall:
                _run(_pip(python, "uninstall", "-y", *release.uninstall), log, env=base)
            stamp.write_text(spec)
        # Editable, every run: the cached venv must test this checkout, wherever it is.
        _run(
            _pip(
                python,
                "install",
                "--no-deps",
                "--no-build-isolation",
                "-e",
                str(REPO),
                "-e",
                str(REPO / "bench"),
            ),
            log,
            env=base,
        )
        return Env(python, base)
    if release.install != "target":
        raise SetupError(f"unknown install kind {release.install!r}")
    if fresh:
        wheels = cache / "wheels"
        reqs = [f"{release.package}=={release.version}", *release.extra]
        _run(_pip(sys.executable, "download", "--no-deps", "-d", str(wheels), *reqs), log, env=base)
        if release.full:
            _check_torch_pin(release, wheels)
        shutil.rmtree(root, ignore_errors=True)
        _run(
            _pip(
                sys.executable,
                "install",
                "--no-deps",
                "--no-compile",  # Python compiles what the tests import; most of vLLM they never do
                "--no-index",
                "--find-links",
                str(wheels),
                "--target",
                str(root),
                *reqs,
            ),
            log,
            env=base,
        )
        if release.source_patch:
            # The ceiling keeps git from finding an enclosing repository (the cache may sit in one).
            git_env = dict(base, GIT_CEILING_DIRECTORIES=str(root.parent))
            _run(["git", "apply", "--verbose", str(REPO / release.source_patch)], log, cwd=root, env=git_env)
        stamp.write_text(spec)
    pythonpath = os.pathsep.join(p for p in (str(root), base.get("PYTHONPATH", "")) if p)
    return Env(sys.executable, dict(base, PYTHONPATH=pythonpath))


def _check_torch_pin(release: Release, wheels: Path) -> None:
    """An engine on a `target` install runs the release's compiled ops on the main .venv's torch."""
    import zipfile

    main_torch = importlib.metadata.version("torch")
    name = release.package.replace("-", "_")
    wheel = next(iter(sorted(wheels.glob(f"{name}-{release.version}-*.whl"))), None)
    if wheel is None:
        raise SetupError(f"no wheel of {release.label} in {wheels}")
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        pins = [
            ln.split("==", 1)[1].split(";")[0].strip()
            for ln in zf.read(meta).decode().splitlines()
            if ln.startswith("Requires-Dist: torch==") and "x86_64" in ln
        ]
    if pins != [main_torch]:
        raise SetupError(
            f"{release.label} pins torch {pins or 'nothing'}, the main .venv has {main_torch}: "
            'its engine needs install = "venv"'
        )


# -- tiers ---------------------------------------------------------------------------
def run_tiers(release: Release, env: Env, out: Path, log: Path, single_thread: bool) -> dict[str, Any]:
    if release.tiers == ("refused",):
        return _check_refused(release, env, log)
    report = out / f"{release.key}.tiers.json"
    report.unlink(missing_ok=True)
    run_env = dict(
        env.env,
        BIDKV_TIER_REPORT=str(report),
        PYTHONPATH=os.pathsep.join(p for p in (str(CI_DIR), env.env.get("PYTHONPATH", "")) if p),
    )
    if single_thread:
        # Releases share the cores. vLLM's CPU worker computes on as many OpenMP threads as
        # there are cores: two engines at once then spin against each other (a 10x slowdown
        # here), while one thread each costs an engine test nothing on the tiny models.
        run_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        env.python,
        "-m",
        "pytest",
        "-m",
        release.marker_expression,
        "-p",
        "tier_report",
        "-p",
        "no:cacheprovider",
        "-q",
        "--durations=10",  # the log names what to trim when the budget gets tight
    ]
    timeout = TIMEOUT_S["full" if release.full else "sched"]
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        # Own session, so a timeout also ends the engine processes the tests started.
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=run_env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"tiers": {t: _failed_tier(f"timed out after {timeout} s") for t in release.tiers}}
    if not report.exists():
        return {"tiers": {t: _failed_tier("pytest wrote no report (crashed?)") for t in release.tiers}}
    data = json.loads(report.read_text())
    tiers: dict[str, Any] = {}
    for name in release.tiers:
        tier = data["tiers"].get(name) or _failed_tier("no test ran")
        if data["exitstatus"] not in (0, 1):  # 2: collection error or interrupted; tests may be missing
            tier.update(ok=False, reason=f"pytest exit status {data['exitstatus']}")
        elif data["unmarked"]:  # `-m` left them out: no tier would ever run them
            tier.update(ok=False, reason="tests without a tier marker", failures=data["unmarked"])
        elif "ok" not in tier:
            tier["ok"] = tier["failed"] == tier["error"] == 0 and tier["passed"] > 0
            tier["reason"] = "" if tier["ok"] else ("failures" if tier["failures"] else "no test passed")
        tiers[name] = tier
    return {"tiers": tiers, "capabilities": data.get("capabilities")}


def _failed_tier(reason: str) -> dict[str, Any]:
    return {
        "passed": 0,
        "failed": 0,
        "error": 0,
        "skipped": 0,
        "seconds": 0.0,
        "failures": [],
        "ok": False,
        "reason": reason,
    }


def _check_refused(release: Release, env: Env, log: Path) -> dict[str, Any]:
    """Below the floor: doctor must answer "unsupported" and name the missing capability."""
    start = time.monotonic()
    proc = subprocess.run(
        [env.python, "-m", "vllm_bidkv.cli", "doctor"],
        cwd=REPO,
        env=env.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    with log.open("a") as f:
        f.write(proc.stdout + proc.stderr)
    verdict = next((ln.split(": ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("vLLM ")), "")
    ok = proc.returncode == 1 and verdict.startswith(f"unsupported: vLLM {release.version} lacks ")
    tier = {
        "passed": int(ok),
        "failed": int(not ok),
        "error": 0,
        "skipped": 0,
        "failures": [] if ok else ["doctor"],
    }
    tier.update(seconds=round(time.monotonic() - start, 2), ok=ok, reason=verdict or "no verdict")
    return {"tiers": {"refused": tier}, "capabilities": {"verdict": verdict}}


def build_release_env(release: Release, cache: Path) -> tuple[Env | None, dict[str, Any]]:
    """The release's environment (None if it could not be built) and the result so far."""
    log = cache / "results" / f"{release.key}.log"
    log.write_text("")
    result: dict[str, Any] = {"key": release.key, "label": release.label, **dataclasses.asdict(release)}
    start = time.monotonic()
    env: Env | None = None
    try:
        env = build_env(release, cache, log)
    except (SetupError, OSError, importlib.metadata.PackageNotFoundError) as err:
        result.update(
            setup_error=str(err), ok=False, tiers={t: _failed_tier("not installed") for t in release.tiers}
        )
    result["setup_seconds"] = round(time.monotonic() - start, 1)
    return env, result


def run_release_tests(
    release: Release, env: Env | None, result: dict[str, Any], cache: Path, single_thread: bool
) -> dict[str, Any]:
    if env is None:
        return result
    out = cache / "results"
    start = time.monotonic()
    result.update(run_tiers(release, env, out, out / f"{release.key}.log", single_thread))
    result["test_seconds"] = round(time.monotonic() - start, 1)
    if release.source_patch and not (result.get("capabilities") or {}).get("vllm_binds_context"):
        # Else the tests would pass on stock sources and prove nothing about the patch.
        for tier in result["tiers"].values():
            tier.update(ok=False, reason="the source patch is not in effect")
    result["ok"] = all(t["ok"] for t in result["tiers"].values())
    return result


def failure_report(result: dict[str, Any], log: Path, tail: int = 25) -> str:
    """Each failed tier's reason and failing tests, then the end of the row's log."""
    lines = [
        f"[matrix]   {name}: {tier.get('reason', '')}; "
        + (", ".join(tier.get("failures", [])) or "no test named")
        for name, tier in result.get("tiers", {}).items()
        if not tier["ok"]
    ]
    if result.get("setup_error"):
        lines.append(f"[matrix]   setup: {result['setup_error']}")
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(lines + [f"[matrix]   | {line}" for line in text[-tail:]])


# -- rendering -------------------------------------------------------------------------
def _cell(tier: dict[str, Any] | None) -> str:
    if tier is None:
        return "–"
    if tier["ok"]:
        skipped = f" +{tier['skipped']} skipped" if tier["skipped"] else ""
        return f"✅ {tier['passed']}{skipped} ({tier['seconds']:.0f} s)"
    bad = tier["failed"] + tier["error"]
    return f"❌ {bad}/{tier['passed'] + bad} ({tier['reason']})"


def supported_line(results: list[dict[str, Any]]) -> str:
    tested = [r for r in results if r["tiers"].keys() != {"refused"}]
    # A version is listed only if every row of it passed (e.g. 0.33.0 with and without the patch).
    failed = {r["version"] for r in tested if not r["ok"]}
    passing = [r for r in tested if r["version"] not in failed]
    versions = sorted({r["version"] for r in passing}, key=_version_key)
    engine = sorted({r["version"] for r in passing if "engine" in r["tiers"]}, key=_version_key)
    if not versions:
        return f"{SUPPORTED_PREFIX} none passed CI."
    return (
        f"{SUPPORTED_PREFIX} {versions[0]} – {versions[-1]} "
        f"(CI runs the Scheduler-level tests on {', '.join(versions)} and the CPU engine on "
        f"{', '.join(engine)}; `vllm-bidkv doctor` calls any other release untested, naming the nearest "
        "tested ones, and refuses one that lacks a capability)."
    )


def render_compat(results: list[dict[str, Any]], floor: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# vLLM compatibility",
        "",
        "<!-- Generated by ci/matrix.py from its results.json; do not edit by hand. -->",
        "",
        supported_line(results),
        "",
        f"Last matrix run: {meta['date']}, commit `{meta['commit']}`, {meta['total_seconds'] / 60:.1f} min "
        f"on {meta['cpus']} cores (`{meta['argv']}`).",
        "",
        *_ci_time(meta),
        "| release | install | result | "
        + " | ".join(TIER_ORDER)
        + " | setup | tests | `vllm-bidkv doctor` |",
        "|---|---|---|" + "---|" * len(TIER_ORDER) + "---|---|---|",
    ]
    for r in results:
        refused = "refused" in r["tiers"]
        result = ("✅" if r["ok"] else "❌") + (" refused as it must be" if refused and r["ok"] else "")
        cells = ["–" if refused else _cell(r["tiers"].get(t)) for t in TIER_ORDER]
        verdict = (r.get("capabilities") or {}).get("verdict") or r.get("setup_error", "?")
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(
            f"| {r['label']}{note} | {r['install']} | {result} | {' | '.join(cells)} "
            f"| {r.get('setup_seconds', 0):.0f} s | {r.get('test_seconds', 0):.0f} s | {verdict} |"
        )
    lines += [
        "",
        "Install kinds: `main` = the project's .venv; `venv` = its own virtualenv with its real "
        "dependencies; `target` = `pip install --no-deps --target` over the main .venv (the release's "
        "sources on the main dependency set; the engine tier only where the release pins the main "
        ".venv's torch, which ci/matrix.py checks). The `unit` tier never imports vLLM and runs "
        "where the engine does. For `refused`, `vllm-bidkv doctor` must answer *unsupported*. "
        "Skipped tests need a capability the release lacks (each skip names it; "
        "`test_offload_needs_worker_meta` checks the refusal instead).",
        "",
    ]
    lines += _engine_subsets(results) + _where_the_time_goes(results)
    lines += [
        "## The floor",
        "",
        floor["why"].strip(),
        "",
    ]
    lines += _capability_table(results)
    failures = [(r["label"], f) for r in results for t in r["tiers"].values() for f in t["failures"]]
    failures += [(r["label"], r["setup_error"]) for r in results if r.get("setup_error")]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {label}: `{what}`" for label, what in failures]
    return "\n".join(lines) + "\n"


def _engine_subsets(results: list[dict[str, Any]]) -> list[str]:
    subset_rows = [r for r in results if r.get("engine_subset") and "engine" in r["tiers"]]
    if not subset_rows:
        return []
    lines = [
        "## The engine tier on the other releases",
        "",
        "Every engine test runs on the main row. To keep CI within its time budget the other "
        "engine rows run only the tests marked with their `engine_subset` (why: `ci/releases.toml`):",
        "",
    ]
    for r in subset_rows:
        ran = sorted((r["tiers"]["engine"].get("tests") or {}).keys())
        lines.append(f"- {r['label']} (`{r['engine_subset']}`): " + ", ".join(f"`{t}`" for t in ran))
    return lines + [""]


def _where_the_time_goes(results: list[dict[str, Any]], top: int = 6) -> list[str]:
    """The slowest tests of each tier of the first row (the one with every tier)."""
    if not results or "tests" not in next(iter(results[0]["tiers"].values()), {}):
        return []
    first = results[0]
    lines = [f"## Where the time goes ({first['label']}, `--durations`)", ""]
    lines += ["| tier | tests | seconds | slowest |", "|---|---|---|---|"]
    for name in TIER_ORDER:
        tier = first["tiers"].get(name)
        if not tier:
            continue
        slow = sorted(tier["tests"].items(), key=lambda kv: -kv[1])[:top]
        shown = "<br>".join(f"{sec:.0f} s `{test.split('/')[-1]}`" for test, sec in slow)
        lines.append(f"| {name} | {len(tier['tests'])} | {tier['seconds']:.0f} | {shown} |")
    return lines + [""]


def _ci_time(meta: dict[str, Any]) -> list[str]:
    if not meta.get("ci_seconds"):
        return []
    cache = "an empty cache" if meta.get("cache_was_empty") else "a warm cache (not the cold figure)"
    return [
        f"CI wall time (`CI=true bash .ci/run`: .venv set-up, pre-commit, this matrix) from a clean "
        f"clone with {cache}: **{meta['ci_seconds'] / 60:.1f} min** on {meta['cpus']} cores "
        "(budget: 40 min).",
        "",
    ]


def _capability_table(results: list[dict[str, Any]]) -> list[str]:
    probed = [
        (r["label"], r["capabilities"])
        for r in results
        if r.get("capabilities") and len(r["capabilities"]) > 1
    ]
    if not probed:
        return []
    names = [n for n in probed[0][1] if n not in ("vllm_version", "verdict")]
    lines = [
        "## Capabilities per release",
        "",
        "Probed from the live classes by `vllm_bidkv.patches.capabilities` in each environment.",
        "",
        "| capability | " + " | ".join(label for label, _ in probed) + " |",
        "|---|" + "---|" * len(probed),
    ]
    for name in names:
        lines.append(f"| `{name}` | " + " | ".join(_fmt(caps.get(name)) for _, caps in probed) + " |")
    return lines


def _fmt(value: Any) -> str:
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return f"`{value}`" if value else "–"


def _meta(argv: list[str], total_seconds: float, cache_was_empty: bool) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout
    # `./dev test` stamps its start, so the whole CI run (set-up, lint, matrix) is measured.
    ci_start = os.environ.get("BIDKV_CI_START")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.strip() or "unknown",
        "cpus": os.cpu_count(),
        "argv": " ".join(["ci/matrix.py", *argv]),
        "total_seconds": round(total_seconds, 1),
        "ci_seconds": round(time.time() - float(ci_start), 1) if ci_start else None,
        "cache_was_empty": cache_was_empty,
    }


def compat_facts(results: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """What `vllm-bidkv doctor` needs from the matrix, shipped in the package (no docs/ in a wheel)."""
    rows = [
        {
            "package": r["package"],
            "version": r["version"],
            "source_patch": bool(r["source_patch"]),
            "passed": r["ok"],
            "tiers": sorted(t for t, v in r["tiers"].items() if v["ok"]),
        }
        for r in results
        if r["tiers"].keys() != {"refused"}
    ]
    return {"date": meta["date"], "commit": meta["commit"], "rows": rows}


def write_docs(results: list[dict[str, Any]], floor: dict[str, Any], meta: dict[str, Any]) -> None:
    (REPO / "docs").mkdir(exist_ok=True)
    facts = json.dumps(compat_facts(results, meta), indent=1)
    (REPO / "vllm_bidkv" / "compat.json").write_text(facts + "\n")
    (REPO / "docs" / "COMPAT.md").write_text(render_compat(results, floor, meta))
    line = supported_line(results)
    (REPO / "docs" / "SUPPORTED.txt").write_text(line + "\n")
    # The README's line is SUPPORTED.txt's (tests/sched/test_capabilities.py checks they agree).
    readme = REPO / "README.md"
    readme.write_text(
        "\n".join(line if ln.startswith(SUPPORTED_PREFIX) else ln for ln in readme.read_text().split("\n"))
    )


# -- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="releases at once")
    parser.add_argument(
        "--only", nargs="+", metavar="KEY", help="run only these (release keys or versions); no docs"
    )
    parser.add_argument(
        "--render-only", action="store_true", help="re-render the docs from the last results.json"
    )
    args = parser.parse_args(argv)

    cache = Path(os.environ.get("BIDKV_CI_CACHE") or Path.home() / ".cache" / "vllm-bidkv-ci")
    (cache / "results").mkdir(parents=True, exist_ok=True)
    results_path = cache / "results.json"
    releases, floor = load_config()
    if args.render_only:
        saved = json.loads(results_path.read_text())
        write_docs(saved["results"], floor, saved["meta"])
        return 0 if all(r["ok"] for r in saved["results"]) else 1
    if args.only:
        releases = [r for r in releases if r.key in args.only or r.version in args.only]
        if not releases:
            parser.error(f"no release matches {args.only}")

    start = time.monotonic()
    # Build the tiny model once, before parallel runs would each build it.
    subprocess.run(
        [sys.executable, "-c", "from vllm_bidkv_bench.tiny_model import tiny_model_dir; tiny_model_dir()"],
        check=True,
    )
    results: dict[str, dict[str, Any]] = {}
    cache_was_empty = not any(cache.glob("envs/*")) and not any(cache.glob("wheels/*"))
    full = [r for r in releases if r.full]
    # The main row (every engine test, most of CI) starts first; the Scheduler-level rows run
    # beside it, then the other engine rows, so two engines rarely run at once.
    order = full[:1] + [r for r in releases if not r.full] + full[1:]
    # One builder, in that order: installs are disk-bound and the tests beside them need the cores.
    builder = ThreadPoolExecutor(max_workers=1)
    envs = {r.key: builder.submit(build_release_env, r, cache) for r in order}

    def run(release: Release, single_thread: bool) -> None:
        env, result = envs[release.key].result()
        print(f"[matrix] {release.label}: start", flush=True)
        result = run_release_tests(release, env, result, cache, single_thread)
        results[release.key] = result
        summary = ", ".join(f"{t} {'ok' if v['ok'] else 'FAIL'}" for t, v in result["tiers"].items())
        where = "" if result["ok"] else f"  log: {cache / 'results' / release.key}.log"
        seconds = f"setup {result['setup_seconds']:.0f} s, tests {result.get('test_seconds', 0):.0f} s"
        print(f"[matrix] {release.label}: {summary} ({seconds}){where}", flush=True)
        if not result["ok"]:  # CI shows only this output: say why here, not only in the log
            print(failure_report(result, cache / "results" / f"{release.key}.log"), flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(lambda r: run(r, args.jobs > 1), order))
    builder.shutdown()

    ordered = [results[r.key] for r in releases]
    total = time.monotonic() - start
    print(f"[matrix] total {total / 60:.1f} min")
    if not args.only:
        meta = _meta(argv, total, cache_was_empty)
        results_path.write_text(json.dumps({"meta": meta, "results": ordered}, indent=2))
        write_docs(ordered, floor, meta)
        print(supported_line(ordered))
    failed = [r["label"] for r in ordered if not r["ok"]]
    if failed:
        print(f"[matrix] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
