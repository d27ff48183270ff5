"""Imports only flow downward (docs/DESIGN.md, "Layers").

The pure layer imports neither vLLM nor torch; the runtime packages never import a benchmark;
the kernel modules form no import circle. Each import check runs in a fresh interpreter, since
this process has usually imported everything already.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_bidkv"

# The pure layer: these and every module under them import neither vllm nor torch. Add a
# module here when it joins the layer.
PURE_MODULES = (
    "vllm_bidkv.config",
    "vllm_bidkv.context",
    "vllm_bidkv.policy",
    "vllm_bidkv.counters",
    "vllm_bidkv.offload",
    "vllm_bidkv.scheduler_side",
    "vllm_bidkv.step_events",
)
FORBIDDEN_IN_PURE = ("vllm", "torch")

# The benchmarks and their fixtures (workloads, simulator, engine runner, soak, tiny models,
# standalone scheduler): a distribution of their own, ``bench/``.
BENCH_PACKAGE = "vllm_bidkv_bench"
# The one runtime module that may reach the benchmarks: the command line imports them, lazily,
# for ``vllm-bidkv bench`` and ``demo`` only. No serving process loads it.
NOT_RUNTIME = {"vllm_bidkv.cli"}


def imported_after(code: str) -> list[str]:
    """The module names in sys.modules after running ``code`` in a fresh interpreter."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    modules: list[str] = json.loads(out.stdout.splitlines()[-1])
    return modules


def is_benchmark(name: str) -> bool:
    return name.split(".")[0] == BENCH_PACKAGE


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every vllm_bidkv module ``path`` imports, at module level or inside a function."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name.split(".")[0] in ("vllm_bidkv", BENCH_PACKAGE)}


def runtime_sources() -> dict[str, Path]:
    sources = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: path
        for name, path in sources.items()
        if not any(name == skip or name.startswith(skip + ".") for skip in NOT_RUNTIME)
    }


def test_pure_layer_imports_neither_vllm_nor_torch() -> None:
    code = (
        "import importlib, pkgutil\n"
        f"for name in {list(PURE_MODULES)!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    for info in pkgutil.walk_packages(getattr(module, '__path__', []), name + '.'):\n"
        "        importlib.import_module(info.name)\n"
    )
    modules = imported_after(code)
    assert set(PURE_MODULES) <= set(modules)  # the check ran
    bad = [m for m in modules if m.split(".")[0] in FORBIDDEN_IN_PURE]
    assert not bad, f"the pure layer imported {bad[:10]}"


def test_a_serving_process_imports_no_benchmark_or_fixture() -> None:
    """What vLLM loads (the plugin, registered; the connector) and every other runtime module:
    none of it pulls in the benchmarks or their fixtures."""
    runtime = sorted(runtime_sources())
    code = (
        "import importlib, vllm_bidkv.plugin\n"
        "vllm_bidkv.plugin.register()\n"
        "import vllm_bidkv.connectors.bidkv_connector\n"
        f"for name in {runtime!r}:\n"
        "    importlib.import_module(name)\n"
    )
    modules = imported_after(code)
    assert {
        "vllm_bidkv.plugin",
        "vllm_bidkv.connectors.bidkv_connector",
        "vllm_bidkv.kernels.block_copy",
    } <= set(modules)
    assert "vllm" in modules  # the connector's module imports vLLM: this is a serving process's view
    assert not [m for m in modules if is_benchmark(m)]


def test_the_plugin_wheel_holds_no_benchmark_or_fixture(tmp_path: Path) -> None:
    """``pip wheel`` of the plugin (no extra): the runtime package only."""
    root = PACKAGE.parent
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(PACKAGE, tmp_path / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        "dist",
        ".",
    ]
    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("vllm_bidkv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vllm_bidkv/connectors/bidkv_connector.py" in names
    fixtures = [
        n for n in names if n.startswith(f"{BENCH_PACKAGE}/") or Path(n).stem in ("tiny_model", "standalone")
    ]
    assert fixtures == []


def test_bench_without_the_benchmarks_installed_says_how_to_get_them() -> None:
    code = (
        "import sys\n"
        f"sys.modules[{BENCH_PACKAGE!r}] = None  # as if only the plugin were installed\n"
        "from vllm_bidkv.cli import main\n"
        "sys.exit(main(['bench', 'sim']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "vllm-bidkv bench: the benchmarks are not installed; pip install 'vllm-bidkv[bench]' "
        "(in a checkout: pip install -e ./bench)"
    )


def test_no_runtime_module_imports_a_benchmark_even_lazily() -> None:
    """Function-level imports included: the kernels once reached their benchmark that way."""
    sources = runtime_sources()
    assert "vllm_bidkv.kernels.triton_copy" in sources and "vllm_bidkv.policy" in sources
    assert not [name for name in sources if is_benchmark(name)], "a benchmark module in a runtime package"
    offenders = {name: sorted(filter(is_benchmark, imports_of(path))) for name, path in sources.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_kernel_modules_form_no_import_circle() -> None:
    sources = {
        name: path for name, path in runtime_sources().items() if name.startswith("vllm_bidkv.kernels.")
    }
    graph = {name: imports_of(path) & set(sources) for name, path in sources.items()}
    assert "vllm_bidkv.kernels.layout" in graph["vllm_bidkv.kernels.triton_copy"]  # the scan sees imports

    def circle_from(start: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for target in sorted(graph[path[-1]]):
            if target == start:
                return (*path, start)
            if target not in path:
                found = circle_from(start, (*path, target))
                if found:
                    return found
        return None

    circles = [circle for name in graph if (circle := circle_from(name, (name,)))]
    assert not circles, " -> ".join(circles[0])


def _module_aliases(tree: ast.Module) -> set[str]:
    """Names a source binds to runtime modules (``import vllm_bidkv.x as y``, ``from vllm_bidkv.p import m``)."""
    runtime = set(runtime_sources()) | {"vllm_bidkv"}
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vllm_bidkv":
                    aliases.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm_bidkv":
            aliases.update(
                alias.asname or alias.name for alias in node.names if f"{node.module}.{alias.name}" in runtime
            )
    return aliases


def test_no_benchmark_assigns_an_attribute_of_a_runtime_module() -> None:
    """Benchmarks observe the runtime through its public hooks (e.g. the victim-choice observer),
    never by replacing its functions: a replaced function outlives the run that replaced it."""
    bench = PACKAGE.parent / "bench" / BENCH_PACKAGE
    sources = sorted(bench.rglob("*.py"))
    assert len(sources) > 10
    found = []
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
                targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(target, ast.Attribute) and isinstance(root, ast.Name) and root.id in aliases:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(target)}")
    assert found == []


MAX_MODULE_LINES = 350


def test_no_runtime_module_is_over_350_lines() -> None:
    """A module past this many lines holds more than one idea: split it along its seam. Every
    module of the runtime package counts, the command line's too."""
    paths = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "cli.py" in paths
    counts = {str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines()) for path in paths}
    assert {path: n for path, n in counts.items() if n > MAX_MODULE_LINES} == {}
