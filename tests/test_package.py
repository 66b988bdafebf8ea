"""Packaging and house rules: import direction, CLI entry points, memcnn warning filters."""

import ast
import pathlib
import subprocess
import sys

import pytest

import iunet3d
from tests.helpers.cli import run_cli

PACKAGE = pathlib.Path(iunet3d.__file__).parent
FORBIDDEN = ("zarr", "torchio", "wandb", "iunet3d.data", "iunet3d.train", "iunet3d.infer")


@pytest.mark.slow
def test_models_import_nothing_of_data_train_infer_zarr_torchio_wandb():
    code = (
        "import sys, iunet3d, iunet3d.models, iunet3d.layers, iunet3d.models.registry\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m.startswith({FORBIDDEN!r}))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    for path in (PACKAGE / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
                assert not name.startswith("torch.distributed"), f"{path.name} imports {name} (DDP)"


def imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_torchio_is_imported_only_by_the_transforms_module_and_the_baseline_benchmark():
    importers = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if any(name.split(".")[0] == "torchio" for name in imported_modules(path))
    }
    assert importers <= {"patches/transforms.py", "bench/data.py"}
    assert "patches/transforms.py" in importers


def test_data_tools_import_neither_torch_nor_the_model():
    """The store is torch-free: every module of iunet3d/data, the synthetic CT, conversion and the CLI
    parser import no torch (conversion workers stay light)."""
    modules = sorted(f"iunet3d.data.{path.stem}" for path in (PACKAGE / "data").glob("*.py") if path.stem != "__init__")
    code = (
        f"import sys, importlib, iunet3d, iunet3d.data, iunet3d.cli\nfor m in {modules!r}: importlib.import_module(m)\n"
        "iunet3d.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'memcnn', 'torchio', 'wandb')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(modules) >= 13
    assert result.stdout.strip() == "[]"


#: The layers of the package, lowest first: a folder imports only from folders of a lower layer (and from
#: itself). The top-level modules iunet3d/__init__.py and layers.py re-export the model; host_memory (the C
#: allocator's handling of freed memory) imports nothing of the package.
LAYERS = [
    {"models", "data", "distributed", "tracking", "host_memory"},
    {"patches", "infer"},
    {"train"},
    {"plan"},
    {"bench"},
    {"cli"},
    {"__main__"},
]


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "iunet3d" and len(parts) > 1 else None


def package_import_graph() -> dict[str, set[str]]:
    """Which folder (or top-level module) of the package imports which, from every import statement."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        source = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        targets = {_folder(name) for name in imported_modules(path)} - {None, source}
        graph.setdefault(source, set()).update(targets)
    return graph


def test_import_graph_follows_the_layer_order():
    """models, data, distributed, tracking -> patches, infer -> train -> plan -> bench -> cli: no import runs back
    up or sideways."""
    layer = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}
    layer.update({"__init__": 0, "layers": 0})
    graph = package_import_graph()
    assert set(graph) <= set(layer), f"folders without a layer: {set(graph) - set(layer)}"
    upward = [(source, target) for source, targets in graph.items() for target in targets
              if target not in {"__init__", "layers"} and layer[target] >= layer[source]
              and not (source in {"__init__", "layers"} and target == "models")]  # fmt: skip
    assert upward == [], f"imports that run up or sideways across the layers: {upward}"
    assert graph["data"] == set() and graph["models"] == set() and graph["distributed"] == set()
    assert graph["host_memory"] == set()
    assert graph["patches"] == {"data", "host_memory"} and graph["tracking"] == set()


def test_wandb_is_imported_only_by_the_tracking_package_and_lazily():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        statements = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        top_level = {alias.name for node in statements if isinstance(node, ast.Import) for alias in node.names}
        top_level |= {node.module or "" for node in statements if isinstance(node, ast.ImportFrom)}
        relative = path.relative_to(PACKAGE).as_posix()
        assert not any(str(name).split(".")[0] == "wandb" for name in top_level), f"{relative} imports wandb eagerly"
        if any(name.split(".")[0] == "wandb" for name in imported_modules(path)):
            assert relative.startswith("tracking/"), f"{relative} imports wandb outside iunet3d/tracking"


def test_patch_pipeline_names_still_import_from_data_with_a_deprecation_warning():
    import warnings

    import iunet3d.data
    import iunet3d.patches

    for name in ("PatchStream", "PatchLoader", "ValidationPatches", "validation_loader", "split_cases"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            moved = getattr(iunet3d.data, name)
        assert moved is getattr(iunet3d.patches, name)
        assert [w.category for w in caught] == [DeprecationWarning], name
        assert f"iunet3d.patches.{name}" in str(caught[0].message)


@pytest.mark.slow
def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "iunet3d", "bench", "memory", "--help"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--depths" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "iunet3d"], capture_output=True, text=True)
    assert missing.returncode == 2 and "COMMAND" in missing.stderr


def test_console_script_is_installed():
    script = pathlib.Path(sys.executable).parent / "iunet3d"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "bench" in result.stdout


@pytest.mark.slow
def test_memcnn_is_imported_only_by_its_engine_and_its_deprecation_warnings_are_filtered_but_others_are_not():
    code = (
        "import sys, warnings, torch\n"
        "from iunet3d import iUNet\n"
        "iUNet(4, [1, 1], dim=2)(torch.randn(1, 4, 8, 8)).sum().backward()\n"
        "print('memcnn' in sys.modules)\n"
        "m = iUNet(4, [1, 1], dim=2, reversible_engine='memcnn')\n"
        "m(torch.randn(1, 4, 8, 8)).sum().backward()\n"
        "warnings.warn('a user warning still shows', UserWarning)\n"
    )
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"  # the default (fused) engine does not need memcnn
    assert "custom_fwd" not in result.stderr and "custom_bwd" not in result.stderr
    assert "TypedStorage" not in result.stderr
    assert "a user warning still shows" in result.stderr
    assert result.stderr.count("Warning") == 1, result.stderr


def test_cli_reports_bad_arguments_without_traceback(capsys):
    code, error = run_cli(["bench", "memory", "--depths", "2"], capsys)
    assert code == 2
    assert error.startswith("iunet3d: error: --depths: depth 2 must be >= levels=3") and "\n" not in error


def test_ruff_clean():
    """House rule: ruff lint and format clean (ruff comes with the dev extra)."""
    root = PACKAGE.parent
    ruff = pathlib.Path(sys.executable).parent / "ruff"
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([str(ruff), *args], cwd=root, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
