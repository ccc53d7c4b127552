"""The package's layering: a module imports only modules listed above it, so there is no
import cycle, and only the command line parses arguments."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "firm"
# The layout of STYLE.md: data -> views and outliers -> encoder -> loss; encoder -> features
# -> scorer -> metrics; then the run machinery, the detector, the grids and the command line.
LAYERS = ["registry", "config", "serialization", "losses", "views", "shifts", "shift_choice", "backbone",
          "efficientnet", "models", "data", "training", "features", "scoring", "evaluation", "stats", "maps", "runner",
          "rundir", "detector", "inference", "bench", "bench_stats", "bench_report", "report", "export", "speed", "cli",
          "__main__"]


def _imports(path: Path) -> set[str]:
    """Every firm module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("firm."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("firm.")}
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), "add new modules to LAYERS (and to the README's module table)"


@pytest.mark.parametrize("module", LAYERS)
def test_imports_only_lower_layers(module):
    lower = set(LAYERS[:LAYERS.index(module)])
    assert _imports(SRC / f"{module}.py") <= lower, f"{module} imports a module at or above its layer"


def test_only_the_cli_parses_arguments():
    for path in SRC.glob("*.py"):
        if path.stem in ("cli", "__main__"):
            continue
        text = path.read_text()
        assert "argparse" not in text and "sys.argv" not in text, f"{path.name} parses the command line"
