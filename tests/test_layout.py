"""The package's shape: imports run one way through the layers, with no cycle, and ``import bfpo_ray`` is light.

The layers, lowest first (a module may import its own layer and the ones below):

    base        config, storage, cluster, models, model_import, data.*, toyworld.*
    logprobs    the batch layouts, log-prob kernels and forwards
    prepare     prepare.* (read, adapt, split, tokenize, score with the reference, write)
    objectives  loss, objectives
    train       train.*
    evaluate    evaluate.*
    sweep       the Ray Tune helpers
    pipeline    pipeline, then the command line (__main__)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bfpo_ray"
LAYERS = ("base", "logprobs", "prepare", "objectives", "train", "evaluate", "sweep", "pipeline")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    name = module.removeprefix("bfpo_ray").lstrip(".")
    top = name.split(".")[0]
    if top in ("loss", "objectives"):
        return LAYERS.index("objectives")
    if top == "__main__":
        return LAYERS.index("pipeline")
    return LAYERS.index(top) if top in LAYERS else 0


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The bfpo_ray modules a file imports (``from bfpo_ray.x import y`` counts y when it is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("bfpo_ray")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bfpo_ray"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(
                    child
                    if (PACKAGE.parent / child.replace(".", "/")).with_suffix(".py").is_file()
                    or (PACKAGE.parent / child.replace(".", "/")).is_dir()
                    else node.module
                )
    return found


def graph(top_level_only: bool) -> dict[str, set[str]]:
    return {module_name(path): imports(path, top_level_only) for path in PACKAGE.rglob("*.py")}


def test_imports_run_one_way_through_the_layers():
    wrong = [
        f"{module} ({LAYERS[layer(module)]}) imports {target} ({LAYERS[layer(target)]})"
        for module, targets in graph(top_level_only=False).items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert not wrong, wrong


def test_no_import_cycle():
    edges = graph(top_level_only=True)
    # a package's __init__ runs before its submodules: importing bfpo_ray.a.b imports bfpo_ray.a first (an
    # __init__ that imports a child of its own is the usual pattern: Python handles that pair)
    for module in list(edges):
        parent = module.rsplit(".", 1)[0]
        if parent in edges and parent != module and module not in edges[parent]:
            edges[module] = edges[module] | {parent}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(module) :] + [module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if target != module:
                visit(target, trail + [module])
        state[module] = 2

    for module in sorted(edges):
        visit(module, [])


def test_importing_the_package_loads_no_experiment_torch_or_ray():
    code = (
        "import sys, bfpo_ray; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('experiments', 'torch', 'ray', 'transformers', 'deepspeed')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]"
    assert not (PACKAGE / "experiments").exists()


# Forked from one interpreter that has imported these (and no bfpo_ray module), so that each child imports only
# the package's own modules in its own order: a cycle in bfpo_ray shows, without paying torch's import per module.
THIRD_PARTY = ("numpy", "pyarrow", "pydantic", "yaml", "torch", "transformers", "peft", "datasets", "deepspeed", "ray")
FORKED_IMPORTS = """
import importlib, os, sys, traceback
for name in sys.argv[1].split(","):
    importlib.import_module(name)
failed = []
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("failed:", failed)
"""


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process with no other bfpo_ray module loaded (a cycle hidden by import order
    shows here; Ray workers import modules in their own order)."""
    modules = sorted(name for name in graph(top_level_only=True) if name != "bfpo_ray.__main__")
    loaded = subprocess.run(
        [sys.executable, "-c", FORKED_IMPORTS, ",".join(THIRD_PARTY), *modules],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0 and loaded.stdout.strip().endswith("failed: []"), loaded.stdout + loaded.stderr
