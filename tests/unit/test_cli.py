"""The ``fm`` command: every subcommand answers --help (with its own usage line), unknown commands get a
suggestion, and the console entry point is declared."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fm import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_subcommand_has_a_real_help(name, capsys):
    try:
        rc = cli.main([name, "--help"])
    except SystemExit as e:  # argparse's --help
        rc = e.code
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith(f"usage: fm {name}"), out[:200]
    assert len(out.splitlines()) > 4  # options are described, not only listed


def test_top_level_help_and_errors(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert re.search(rf"^  {re.escape(name)} +\S", out, re.M), name
    assert cli.main([]) == 2
    assert cli.main(["trian"]) == 2
    assert 'unknown command \'trian\'; did you mean "train"?' in capsys.readouterr().err
    assert cli.main(["train"]) == 2
    assert "no train config: give --config TRAIN.json" in capsys.readouterr().err


def test_console_script_is_declared():
    assert '"fm = fm.cli:main"' in (ROOT / "setup.py").read_text()
