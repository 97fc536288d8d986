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


def test_meal_v2_table_commands_spend_the_published_budget(tmp_path, monkeypatch):
    """Each `mealv2 train` of README's MEAL V2 table: 180 epochs of N crops at a global batch of 512, lr 0.01
    x0.1 at epoch 100, pretrained; and the replay figures README states follow from its label commands."""
    import shlex

    from mealv2.stage2_train.modes import replays

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The MEAL V2 table, as mealv2 commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    env = dict(re.findall(r'^(\w+)="?(.*?)"?$', block, re.M))
    env["IN"] = str(tmp_path)   # the paths must exist for click: an empty stand-in for ImageNet and the stores
    for folder in ("train", "val", *re.findall(r"([\w-]+\.zarr)", block)):
        (tmp_path / folder).mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    train = cli.get_command(None, "train")
    label = cli.get_command(None, "label")
    trained = labelled = 0
    for line in block.splitlines():
        for _ in range(2):   # COMMON holds $IN
            line = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), line.strip())
        if line.startswith("mealv2 train"):
            p = train.make_context("train", shlex.split(line)[2:]).params
            assert (p["epochs"], p["batch_size"], p["lr"], p["lr_step"], p["pretrained"], p["cos"]) == (
                180, 512, 0.01, 100, True, False), line
            trained += 1
        elif line.startswith("mealv2 label"):
            p = label.make_context("label", shlex.split(line)[2:]).params
            passes = 180 / p["crops_per_image"]          # epochs of N crops, C crops per image and pass
            rounds, words = p["rounds"], {1: "once", 2: "twice", 3: "three times"}
            extra, most, least = int(passes) % rounds, -(-int(passes) // rounds), int(passes) // rounds
            # pass p replays round p mod R: the first `extra` rounds once more than the others, as the plan says
            assert replays(passes, rounds) == (f"rounds 0-{extra - 1} {most}.0 times, rounds {extra}-{rounds - 1} "
                                               f"{least}.0 times; {passes / rounds:.2f} on average")
            assert f"{passes:g} passes" in section and (
                f"pass p replays round p mod {rounds}: rounds 0-{extra - 1} {words[most]}, rounds "
                f"{extra}-{rounds - 1} {words[least]} ({passes / rounds:g} on average") in section.replace("\n", " ")
            labelled += 1
    assert (trained, labelled) == (8, 2)


def test_the_readme_loop_and_the_ddp_example_load_their_checkpoints_as_data():
    """They teach the habit mealv2 keeps (torch.load(weights_only=True): a pickle of objects can run code as
    it loads); tests/test_api.py runs both, resuming, so what they save loads that way."""
    readme = (ROOT / "README.md").read_text()
    sources = {"README.md": "\n".join(re.findall(r"```python\n(.*?)```", readme, re.S)),
               "examples/ddp_train.py": (ROOT / "examples" / "ddp_train.py").read_text()}
    for name, code in sources.items():
        loads = re.findall(r"torch\.load\(([^)]*)\)", code)
        assert loads, f"{name} loads no checkpoint: update this test"
        for args in loads:
            assert "weights_only=True" in args, f"{name}: torch.load({args})"
