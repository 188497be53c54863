"""The README's two commands run one after the other in one checkout: the main job leaves
bdiff.safetensors and samples.npy in the repository root, and the tests must not care."""
from bdiff.cli.main import app
from typer.testing import CliRunner


def test_default_outputs_of_an_earlier_run_do_not_change_a_failure(tmp_path):
    (tmp_path / "bdiff.safetensors").write_bytes(b"left by the README's main job")
    result = CliRunner().invoke(app, ["fit", str(tmp_path / "nope.npy")])
    assert result.exit_code == 2 and "no such file" in result.stderr, result.stderr
