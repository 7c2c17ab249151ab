"""The import rules ARCHITECTURE.md states, checked transitively: each package's modules are
all imported in a fresh process and every module that import loaded is judged, so a rule
broken through a third module (engine/ -> objectives/ -> data/) fails as a direct one."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from helpers import REPO

from pretrain.__main__ import VERBS

# Prints what importing every module of the given packages loads: the pretrain modules
# (with their files) and whether deepspeed and torch came with them.
PROBE = """
import importlib, json, pkgutil, sys
for name in sys.argv[1:]:
    root = importlib.import_module(name)
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), name + "."):
        importlib.import_module(info.name)
loaded = {k: getattr(m, "__file__", None) for k, m in sys.modules.items()
          if k == "pretrain" or k.startswith("pretrain.")}
print(json.dumps({"pretrain": loaded, "deepspeed": "deepspeed" in sys.modules,
                  "torch": "torch" in sys.modules}))
"""

# The modules that are command lines (the verbs' argparse and main, but the trainer's, whose
# loop is the library's): the library never loads them.
COMMAND_LINES = tuple(
    {"pretrain.__main__"}
    | {target.partition(":")[0] for target, _ in VERBS.values()} - {"pretrain.train"}
)


def loaded_by(cli, *packages: str) -> dict:
    result = cli("-c", PROBE, *packages)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def in_package(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


RULES = {
    # package(s) imported -> packages that must not come with them
    "model": (
        ("pretrain.model",),
        ("pretrain.engine", "pretrain.export", "pretrain.train", "pretrain.distillation"),
    ),
    "data": (
        ("pretrain.data",),
        ("pretrain.engine", "pretrain.export", "pretrain.train", "pretrain.distillation"),
    ),
    "engine": (
        ("pretrain.engine",),
        ("pretrain.data", "pretrain.export", "pretrain.train", "pretrain.distillation"),
    ),
    "library": (
        (
            "pretrain.model",
            "pretrain.data",
            "pretrain.objectives",
            "pretrain.export",
            "pretrain.engine",
            "pretrain.evaluate",
            "pretrain.distillation",
            "pretrain.train",
        ),
        COMMAND_LINES,
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("rule", list(RULES))
def test_a_package_never_loads_what_the_architecture_forbids(cli, rule):
    packages, forbidden = RULES[rule]
    loaded = loaded_by(cli, *packages)["pretrain"]
    assert [m for m in loaded if in_package(m, forbidden)] == []


@pytest.mark.e2e
def test_the_model_and_data_load_no_deepspeed_and_no_module_of_theirs_imports_distribution(
    cli,
):
    """`import torch` loads torch.distributed itself, so its use is judged in the sources
    of every module the import loaded, not in sys.modules."""
    probe = loaded_by(cli, "pretrain.model", "pretrain.data")
    assert not probe["deepspeed"]
    for module, file in probe["pretrain"].items():
        for name in imported_names(Path(file)):
            assert not name.startswith(("deepspeed", "torch.distributed")), (module, name)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "package",
    [
        "pretrain.config",
        "pretrain.sharing",
        "pretrain.labels",
        "pretrain.families",
        "pretrain.engine.manifest",  # export and the preflight read checkpoints through it
        "pretrain.engine.resume",
    ],
)
def test_configs_and_plans_are_checked_without_torch(cli, package):
    assert not loaded_by(cli, package)["torch"]


@pytest.mark.unit
def test_torch_load_is_patched_in_one_module_only():
    """DeepSpeed's converters call torch.load themselves: the patch that makes those loads
    weights-only lives in engine/universal.py, and nothing else mocks anything."""
    patching = [
        path.relative_to(REPO).as_posix()
        for path in (REPO / "pretrain").rglob("*.py")
        if any(name.startswith("unittest") for name in imported_names(path))
    ]
    assert patching == ["pretrain/engine/universal.py"]


@pytest.mark.unit
def test_only_the_engine_imports_deepspeed():
    for path in (REPO / "pretrain").rglob("*.py"):
        if path.parent.name == "engine":
            continue
        for name in imported_names(path):
            assert not name.startswith("deepspeed"), (path.relative_to(REPO), name)
