"""README's quick start is what CI runs, and every command it names exists."""
from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from mealv2.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[1]


def quick_start() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_quick_start_is_set_up_demo_and_tests():
    setup, main, tests = quick_start()
    assert "pip install" in setup and ".[test]" in setup
    assert main.endswith("mealv2 demo")
    assert "pytest" in tests


def test_ci_runs_the_readme_set_up_and_test_commands():
    setup, _, tests = quick_start()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup in ci, f"README's set-up command is not a line of .ci/run: {setup}"
    assert tests in ci, f"README's test command is not a line of .ci/run: {tests}"


def test_every_mealv2_subcommand_in_the_readme_exists_and_has_help():
    readme = (ROOT / "README.md").read_text()
    code = "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S) + re.findall(r"`([^`\n]+)`", readme))
    named = set(re.findall(r"\bmealv2 ([a-z]+)\b", code))
    assert named <= set(COMMANDS), f"README names unknown subcommands: {named - set(COMMANDS)}"
    runner = CliRunner()
    for name in sorted(named):
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, f"mealv2 {name} --help failed:\n{result.output}"


def test_readme_flags_exist_on_their_commands():
    """Every --flag written after `mealv2 label`/`train`/`eval` in README's code blocks is a real option."""
    readme = (ROOT / "README.md").read_text()
    runner = CliRunner()
    helps = {name: runner.invoke(cli, [name, "--help"]).output for name in ("label", "train", "eval", "export")}
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"\bmealv2 (label|train|eval|export)\b(.*)", line)
            if not m:
                continue
            for flag in re.findall(r"(--[a-z][a-z0-9-]*)", m.group(2)):
                assert flag in helps[m.group(1)], f"README: `mealv2 {m.group(1)} {flag}` is not an option"
