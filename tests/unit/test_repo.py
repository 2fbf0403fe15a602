"""The front door stays true: CI runs exactly the README's test command."""

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
