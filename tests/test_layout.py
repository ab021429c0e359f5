"""The package layout's import rules (pipeline/__init__.py): stages import only earlier stages, the
library never imports its entrypoints, and the network knows nothing of Ray, MLflow or the pipeline."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What each part of pipeline/ may import from the project (besides itself and pipeline.PROJECT_ROOT).
ALLOWED = {
    "config": {"data.rand_augment"},
    "cluster": {"config"},
    "data": {"config", "cluster"},
    "tracking": {"config", "cluster", "data", "model"},
    "training": {"config", "cluster", "data", "tracking", "model"},
    "demo": {"config", "cluster", "data", "tracking", "training"},
    "bench": {"config", "cluster", "data", "tracking", "training", "model"},
}


def project_imports(path: Path) -> set[str]:
    """Dotted names of the project modules `path` imports, anywhere in the file (function-local too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            found |= {f"{base}.{a.name}" for a in node.names} if base in ("pipeline", "model", "jobs") else {base}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] in ("pipeline", "model", "jobs")}


def part_of(module: str) -> str:
    """`pipeline.data.clips` -> `data`; `model.uniformer` -> `model`; `jobs.cli` -> `jobs`."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else parts[0]


def test_stages_import_only_what_pipeline_init_allows():
    broken = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT / "pipeline")
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for module in sorted(project_imports(path)):
            if module == "pipeline.PROJECT_ROOT" or part_of(module) == own:
                continue
            allowed = ALLOWED[own]
            if part_of(module) not in allowed and module.removeprefix("pipeline.") not in allowed:
                broken.append(f"pipeline/{rel} imports {module}")
    assert not broken, "\n".join(broken)


def test_every_stage_has_rules_and_says_what_it_owns():
    stages = {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__"}
    assert stages | modules == set(ALLOWED)
    for stage in stages:
        assert len(ast.get_docstring(ast.parse((ROOT / "pipeline" / stage / "__init__.py").read_text())) or "") > 80


def test_the_network_knows_nothing_of_ray_mlflow_or_the_pipeline():
    for path in sorted((ROOT / "model").rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        roots = {n.split(".")[0] for n in names}
        assert not roots & {"pipeline", "jobs", "ray", "mlflow"}, f"{path.name} imports {roots}"


def test_the_rules_catch_a_library_module_that_imports_jobs(tmp_path):
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    from jobs.cli import JOBS\n    return JOBS\n")
    assert project_imports(sneaky) == {"jobs.cli"}
    assert "jobs" not in ALLOWED["data"] | ALLOWED["bench"]
