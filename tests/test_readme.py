"""The manual stays true: every config key is in the reference (docs/methods.md), every method
of the method table is in the README's table, the README's quick start has its two commands and
CI runs the test one, and the library examples (docs/library.md) run and learn."""

import dataclasses
import re
from pathlib import Path

from edit_jax.config import Config
from edit_jax.methods import METHODS as METHOD_TABLE

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
METHODS = (ROOT / "docs" / "methods.md").read_text()  # the configuration reference
LIBRARY = (ROOT / "docs" / "library.md").read_text()  # the runnable examples


def test_every_config_key_is_in_the_reference():
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(getattr(Config(), section.name)):
            assert f"`{section.name}.{field.name}`" in METHODS, f"{section.name}.{field.name}"


def test_every_method_of_the_table_is_in_the_readme_table():
    table = README.split("## Methods", 1)[1].split("##", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert rows == list(METHOD_TABLE)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    quick_start = README.split("## Quick start", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick_start, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 2
    assert commands[0].endswith("edit-jax train")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def _run_example(heading: str, capsys) -> float:
    """Run the first Python block under `heading`; the loss it prints."""
    section = LIBRARY.split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, f"docs/library.md example under {heading}", "exec"), {})
    return float(re.search(r"loss ([^\s,]+)", capsys.readouterr().out).group(1))


def test_the_optax_example_runs_and_learns(capsys):
    assert _run_example("### The outer optimizer is plain optax", capsys) < 0.5  # from about 8


def test_the_streaming_example_runs_and_learns(capsys):
    assert _run_example("### Streaming fragments in your own loop", capsys) < 0.5  # from 10


def test_the_compression_example_runs_and_learns(capsys):
    assert _run_example("### Compressed syncs in your own loop", capsys) < 1e-4  # from 256
