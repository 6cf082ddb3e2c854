"""``edgeagent completion bash|zsh``: scripts generated from the parser, that complete."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.cli import build_parser, main


def _script(shell: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["completion", shell]) == 0
    return capsys.readouterr().out


def _complete_bash(script: Path, words: list[str]) -> list[str]:
    """What bash's completion function offers for ``words`` (the last one being typed)."""
    line = " ".join(words)
    code = (f"source {script}\nCOMP_WORDS=({line})\nCOMP_CWORD={len(words) - 1}\n"
            f'COMP_LINE="{line}"\nCOMP_POINT=${{#COMP_LINE}}\n'
            "_shtab_edgeagent edgeagent\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True,
                         timeout=60)
    return out.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_bash_completes_commands_and_options(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "edgeagent.bash"
    script.write_text(_script("bash", capsys))
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert _complete_bash(script, ["edgeagent", "che"]) == ["check-config"]
    assert set(_complete_bash(script, ["edgeagent", "''"])) >= {
        "run", "install-service", "check-config", "probe", "status", "completion"}
    assert "--json" in _complete_bash(script, ["edgeagent", "probe", "--"])
    assert set(_complete_bash(script, ["edgeagent", "completion", "''"])) == {"bash", "zsh"}


def test_zsh_script_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    script = _script("zsh", capsys)
    assert script.startswith("#compdef edgeagent")
    commands = next(a for a in build_parser(full=True)._actions
                    if a.dest == "command").choices
    assert commands
    for name in commands:
        assert name in script
    if shutil.which("zsh"):
        subprocess.run(["zsh", "-n", "-c", script], check=True, timeout=60)


def test_unknown_shell_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "edgeagent", "completion", "fish"],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'fish'" in result.stderr
