"""README.md stays true to the code: its recipes load, its command lines name real commands and flags,
its `make` targets exist. Fast (no model, no subprocess): the click group is introspected."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# ```yaml blocks that are not whole recipes, keyed by their first line, with a str.format template that
# makes one of them a recipe ("{block}" is the block). None today: the `kv_cache:` block is a recipe of
# one section, every other section taking its defaults.
YAML_FRAGMENTS: dict[str, str] = {}


def _fenced(lang: str | None = None) -> list[str]:
    """Bodies of the README's fenced blocks (of one info string, or all of them)."""
    blocks = re.findall(r"^```([^\n]*)\n(.*?)^```", README, re.S | re.M)
    return [body for info, body in blocks if lang is None or info.strip() == lang]


def _yaml_blocks() -> list[str]:
    return _fenced("yaml")


def _command_lines() -> list[str]:
    """Every `trtcompress SUBCOMMAND ...` the README shows: in code blocks (shell comments cut) and in
    inline code spans (a table's `\\|` is a `|`)."""
    lines = []
    for block in _fenced():
        lines += [line for line in block.splitlines() if re.search(r"\btrtcompress [a-z]", line)]
    prose = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    lines += [span.replace("\\|", "|") for span in re.findall(r"`([^`\n]+)`", prose)]
    commands = []
    for line in lines:
        for match in re.finditer(r"(?:^|[\s(;&|])trtcompress (?=[a-z])", line):
            commands.append(line[match.end() :])
    return commands


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in an excerpt: words will do
        return text.split("#")[0].split()


def _resolve(tokens: list[str]) -> tuple[list[str], click.Command, list[str]]:
    from trtcompress.cli import cli

    command: click.Command = cli
    path: list[str] = []
    while tokens and isinstance(command, click.Group) and tokens[0] in command.commands:
        path.append(tokens[0])
        command = command.commands[tokens.pop(0)]
    return path, command, tokens


def _options(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            names |= {*param.opts, *param.secondary_opts}
    return names


def test_the_readme_has_what_these_tests_read():
    assert len(_yaml_blocks()) >= 2
    assert len(_command_lines()) >= 30


@pytest.mark.parametrize("block", _yaml_blocks(), ids=lambda b: b.splitlines()[0])
def test_every_yaml_block_loads_as_a_recipe(block, tmp_path):
    from trtcompress.recipe import load_recipe_file

    wrapper = YAML_FRAGMENTS.get(block.splitlines()[0], "{block}")
    text = wrapper.format(block=block)
    path = tmp_path / "readme.yaml"
    path.write_text(text, encoding="utf-8")
    load_recipe_file(path)  # the loader `--recipe FILE` uses: duplicate keys, YAML 1.2 numbers, strict keys


def test_the_recipe_example_shows_the_default_protocol():
    """The example's `eval:` says "defaults = the reference protocol": its values are the defaults."""
    from trtcompress.eval.config import EvalConfig
    from trtcompress.recipe import yaml_load

    (example,) = [b for b in _yaml_blocks() if "eval:" in b and "defaults" in b]
    shown = yaml_load(example)["eval"]
    defaults = EvalConfig().model_dump()
    assert shown == {key: defaults[key] for key in shown}


def test_the_kv_cache_example_lists_every_codec():
    from trtcompress.kv.config import CODEC_NAMES, KVCacheConfig

    (example,) = [b for b in _yaml_blocks() if b.startswith("kv_cache:")]
    listed = re.search(r"codec: \S+\s+# (.*)", example)[1].split(" | ")
    assert listed == [*CODEC_NAMES, "null"]
    defaults = KVCacheConfig()
    assert re.search(r"block_size: (\d+)", example)[1] == str(defaults.block_size)
    assert re.search(r"sink_tokens: (\d+)", example)[1] == str(defaults.sink_tokens)


def test_every_command_and_flag_the_readme_shows_exists():
    problems = []
    for line in _command_lines():
        tokens = _tokens(line)
        path, command, rest = _resolve(tokens)
        if not path:
            problems.append(f"`trtcompress {line}`: no such command {tokens[:1]}")
            continue
        if isinstance(command, click.Group):
            continue  # `trtcompress bench` alone
        options = _options(command)
        for token in rest:
            flag = token.split("=", 1)[0]
            if re.fullmatch(r"--?[A-Za-z][\w-]*", flag) and flag not in options:
                problems.append(f"`trtcompress {' '.join(path)}`: no option {flag} (in `{line.strip()}`)")
    assert not problems, "\n".join(problems)


# Flags the README quotes from other tools (docker, pip, trtllm-build, the benchmark scripts).
OTHER_FLAGS = {"--build-arg", "--no-deps", "--weight_sparsity", "--gemv-only", "--quick", "--smoke",
               "--group-major", "--llama8b", "--splits"}  # fmt: skip


def test_every_long_flag_in_the_prose_is_a_trtcompress_option():
    """Prose names flags without the command line around them ("`--calib-samples` → `calibration.*`")."""
    from trtcompress.cli import cli

    known = set(OTHER_FLAGS)
    groups = [cli]
    while groups:
        for command in groups.pop().commands.values():
            if isinstance(command, click.Group):
                groups.append(command)
            else:
                known |= _options(command)
    named = set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", README))
    assert named <= known, sorted(named - known)


def test_presets_the_readme_names_exist():
    from trtcompress.recipe import list_presets

    presets = set(list_presets())
    named = set()
    for line in _command_lines():
        tokens = _tokens(line)
        for flag, value in itertools.pairwise(tokens):
            # (a file, or a placeholder such as RECIPE, is not a preset name)
            if flag in ("-r", "--recipe") and not value.endswith((".yaml", ".yml")) and not value.isupper():
                named.add(value)
    assert named and named <= presets, named - presets
    counted = re.search(r"`trtcompress recipes` lists all (\d+)", README)
    assert counted and int(counted[1]) == len(presets)


def test_make_targets_the_readme_names_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = set(re.findall(r"`make ([\w-]+)`", README))
    assert named and named <= targets, named - targets
