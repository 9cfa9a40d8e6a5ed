"""Repository contracts: the Dockerfile copies files that exist and installs like the README,
the demo recipe at the top level is the bundled one, .ci/run runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_copies_existing_files_and_installs_the_package():
    text = (ROOT / "Dockerfile").read_text()
    copies = re.findall(r"^COPY\s+(.+)$", text, flags=re.M)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert re.search(r"pip install .*\.", text) and 'ENTRYPOINT ["snapgen"]' in text
    assert 'CMD ["run"]' in text  # `docker run IMAGE` runs the demo


def test_top_level_demo_recipe_is_the_bundled_one():
    assert (ROOT / "recipes" / "demo.toml").read_text() == (ROOT / "snapgen_cli" / "recipes" / "demo.toml").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_demo_and_paper_recipes_dry_run(run_cli):
    import json

    for recipe in ("demo.toml", "paper.toml"):
        code, out, err = run_cli("run", ROOT / "recipes" / recipe, "--dry-run", "--json")
        assert code == 0, err
        assert json.loads(out)["plan"]


def _third_party_modules() -> set[str]:
    """Top-level modules snapgen_cli imports (anywhere, lazily too) or locates with ``find_spec("...")``."""
    import ast
    import sys

    found = set()
    for path in (ROOT / "snapgen_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "find_spec" and node.args
                  and isinstance(node.args[0], ast.Constant)):
                found.add(node.args[0].value.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"snapgen_cli"}


def test_every_dependency_is_used_and_every_import_is_declared():
    import importlib.metadata
    import tomllib

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    specs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {norm(re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0]) for s in specs}
    dists = importlib.metadata.packages_distributions()
    used = {norm(d) for m in _third_party_modules() for d in dists.get(m, [m])}
    used_otherwise = {"tensorboard",  # accelerate's default tracker (train/loop.py: tracker = "tensorboard")
                      "onnxscript",  # torch.onnx.export(dynamo=True) imports it (export/onnx.py)
                      "scikit-learn"}  # coremltools' k-means palettization imports it (export/coreml.py)
    assert declared - used - used_otherwise == set(), "declared but never imported"
    optional = {"pydantic-core", "image-reward", "imagereward"}  # pydantic's own; ImageReward: optional, guarded
    assert used - declared - optional == set(), "imported but not declared"
