"""One token variable: `distill serve` and `distill train --source remote|read-through` both read DISTILLERY_TOKEN."""

import json

import pytest

from student_trainer.sources import OLD_TOKEN_ENV, TOKEN_ENV, TokenVariableError, endpoint_token
from test_cli import _args

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKEN = "token-for-the-test-0123456789"


def test_endpoint_token_reads_distillery_token_and_refuses_the_old_variable_alone(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(OLD_TOKEN_ENV, raising=False)
    assert endpoint_token(None) is None
    assert endpoint_token("given") == "given"
    monkeypatch.setenv(OLD_TOKEN_ENV, TOKEN)
    with pytest.raises(TokenVariableError, match=r"\$DISTILLERY_TOKEN .* only \$DISTILL_TOKEN"):
        endpoint_token(None)
    assert endpoint_token("given") == "given"
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert endpoint_token(None) == TOKEN


@pytest.mark.slow
def test_train_against_the_real_server_with_the_readme_variable(world, tmp_path, monkeypatch, capsys):
    """The README's flow: `distill serve` and `distill train` with DISTILLERY_TOKEN set; the old name alone is exit 2."""
    from distillery.cli import main
    from teacher_service.api.testing import ServerProcess

    with ServerProcess(world.teacher, token=TOKEN, options=["--torch-threads", "1"]) as server:
        args = _args(world, tmp_path / "run", "--source", "remote", "--endpoint", server.url, "--iters", "1")
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        monkeypatch.setenv(OLD_TOKEN_ENV, TOKEN)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "DISTILLERY_TOKEN" in err and "DISTILL_TOKEN" in err and TOKEN not in err
        assert not (tmp_path / "run" / "last.pt").exists()

        monkeypatch.delenv(OLD_TOKEN_ENV)
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        assert main(args) == 0, capsys.readouterr().err[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["source"]["kind"] == "remote" and results["step"] == 1
