"""Imports only flow downward (docs/DESIGN.md, "Layers").

The pure layer imports neither vLLM nor torch; the runtime packages never import a benchmark;
the kernel modules form no import circle. Each import check runs in a fresh interpreter, since
this process has usually imported everything already.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
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
)
FORBIDDEN_IN_PURE = ("vllm", "torch")

# Runtime modules that must not pull in a benchmark: the command line (``cli``) imports
# ``vllm_bidkv.bench`` only for ``vllm-bidkv bench``, and ``bench`` itself is the benchmarks.
NOT_RUNTIME = {"vllm_bidkv.cli", "vllm_bidkv.bench"}


def imported_after(code: str) -> list[str]:
    """The module names in sys.modules after running ``code`` in a fresh interpreter."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    modules: list[str] = json.loads(out.stdout.splitlines()[-1])
    return modules


def is_benchmark(name: str) -> bool:
    return name == "vllm_bidkv.bench" or name.startswith("vllm_bidkv.bench.") or name.endswith(".bench")


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
    return {name for name in found if name.split(".")[0] == "vllm_bidkv"}


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


def test_importing_kernels_and_policy_imports_no_benchmark() -> None:
    modules = imported_after("import vllm_bidkv.kernels, vllm_bidkv.policy")
    assert {"vllm_bidkv.kernels", "vllm_bidkv.policy", "vllm_bidkv.kernels.block_copy"} <= set(modules)
    assert not [m for m in modules if is_benchmark(m)]


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
