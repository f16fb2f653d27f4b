"""The import rules of STYLE.md: imports point down the module table, mlflow and optuna stay put."""
import ast
from pathlib import Path

ORDER = ["errors", "distributed", "config", "data", "prepare", "model", "heads", "losses", "evaluation", "pictures",
         "checkpoint", "tracking", "stages", "methods", "runner", "tuning", "cli"]
ALLOWED = {
    "errors": set(),
    "distributed": {"errors"},
    "config": {"errors"},
    "data": {"errors", "config", "distributed"},
    "prepare": {"errors", "config", "data"},
    "model": {"errors", "config"},
    "heads": {"errors", "config", "model"},
    "losses": {"errors"},
    "evaluation": {"errors", "distributed", "config", "model", "heads"},
    "pictures": {"errors"},
    "checkpoint": {"errors"},
    "tracking": {"errors", "config", "checkpoint"},
    "stages": {"errors", "distributed", "config", "data", "model", "heads", "losses", "evaluation", "checkpoint",
               "tracking"},
    "methods": {"errors", "distributed", "config", "model", "heads", "losses", "evaluation", "checkpoint", "tracking",
                "stages"},
    "runner": {"errors", "distributed", "config", "data", "model", "heads", "losses", "evaluation", "pictures",
               "checkpoint", "tracking", "stages", "methods"},
    "tuning": {"errors", "config", "runner", "tracking"},
    "cli": set(ORDER) - {"cli"},
}
PACKAGE = Path(__file__).resolve().parents[1] / "workbench"


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    ours, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 2 and node.module:  # from a subpackage (methods/): ..model
                ours.add(node.module.split(".")[0])
            elif node.level == 1:
                if node.module:
                    ours.add(node.module.split(".")[0])
                else:
                    ours.update(alias.name for alias in node.names)
            elif node.module:
                external.add(node.module.split(".")[0])
                if node.module.startswith("workbench."):
                    ours.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                external.add(alias.name.split(".")[0])
    return ours, external


def test_imports_point_down():
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert set(modules) <= set(ORDER), set(modules) - set(ORDER)
    methods = sorted((PACKAGE / "methods").glob("*.py"))
    assert len(methods) > 1
    for name, path in [*modules.items(), *(("methods", p) for p in methods)]:
        ours, external = imports_of(path)
        assert ours <= ALLOWED[name], f"{name} imports {ours - ALLOWED[name]}"
        if name != "tracking":
            assert "mlflow" not in external, f"{name} imports mlflow"
        if name != "tuning":
            assert "optuna" not in external, f"{name} imports optuna"
