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
