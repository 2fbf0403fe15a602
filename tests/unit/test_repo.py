"""The front door stays true: CI runs exactly the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run the tests", 1)[1]
    command = section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines


def test_nothing_installs_a_bare_shared_package():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"pagewire" = "shared"' in pyproject
    assert '"shared"' not in pyproject.split("packages = [", 1)[1].split("]", 1)[0]


def test_ci_installs_into_a_fresh_virtual_environment_before_the_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("python3 -m venv") < ci.index("/bin/activate") < ci.index("pip install")


def test_the_readme_points_only_to_files_the_repository_holds():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert links, "the README links each folder's README"
    assert [link for link in links if not (ROOT / link).is_file()] == []
    assert "DESIGN.md" not in readme  # the architecture lives in the repository
    for folder in ("shared", "services", "protos", "kernels", "tests", "loadtests"):
        assert (ROOT / folder / "README.md").is_file(), f"{folder}/ has no README"


def test_the_readmes_measured_numbers_are_in_the_results():
    readme = (ROOT / "README.md").read_text()
    measured = readme.split("## Measured so far", 1)[1].split("\n## ", 1)[0]
    numbers = re.findall(r"\d[\d,.]*\d(?=x| tokens| req| GB)", measured)
    assert len(numbers) >= 5
    results = (ROOT / "loadtests" / "RESULTS.md").read_text()
    assert [n for n in numbers if n not in results] == []


def test_every_package_folder_is_installed():
    """A folder of shared/, services/ or kernels/ with an __init__.py that pyproject's package
    list lacks works from a checkout and is missing from an installed copy."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(pagewire[\w.]*)"', pyproject.split("packages = [", 1)[1]
                            .split("]", 1)[0]))
    roots = {"shared": "pagewire", "services": "pagewire.services", "kernels": "pagewire.kernels"}
    missing = []
    for folder, package in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" in parts:
                continue
            name = ".".join((package, *parts))
            if name not in listed:
                missing.append(name)
    assert not missing, f"pyproject.toml's packages lack {missing}"
