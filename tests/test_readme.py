"""The README's commands stay true: CI runs the test command verbatim."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("## Two commands", 1)[1].split("## Use", 1)[0].split("```bash\n")[1:]
    return [block.split("\n```", 1)[0].strip() for block in blocks]


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    main_job, test_command = _commands()
    assert "bdiff fit" in main_job and "bdiff sample" in main_job and "--plot" in main_job
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
