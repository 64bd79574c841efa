"""Every command-line default is its config field's default: the options are generated from the
dataclasses, and this walks every option of every command to prove it."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from pneumoscan.cli.flags import add_config, build
from pneumoscan.cli.main import build_parser
from pneumoscan.config import describe, flag
from pneumoscan.train.config import AugmentConfig, FinetuneConfig, TrainConfig

# options that are not settings: what to read and where to write, output formats, and two switches
NOT_SETTINGS = {"--help", "--out", "--model", "--data", "--json", "--csv", "--add-eval", "--name", "--no-augment",
                "--weights", "--save-best", "--version", "--verbose", "--quiet", "--layer", "--overwrite",
                "--cache", "--backbone", "--no-parity"}  # cache list|clear and check: what to look at, not settings


def commands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from commands(sub, f"{prefix}{name} ")


def options():
    for name, sub in commands(build_parser()):
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            continue
        for a in sub._actions:
            if a.option_strings:
                yield name, a


def test_every_option_default_is_its_fields_default():
    checked = 0
    for command, action in options():
        field = getattr(action, "config_field", None)
        if field is None:
            continue
        cls, name = field
        default = {f.name: f.default for f in describe(cls)}[name]
        if action.const is not None and isinstance(action, argparse._StoreConstAction):  # bool switches
            assert action.default == default, f"{command} {action.option_strings[0]}"
        else:
            assert action.default == default, (f"{command} {action.option_strings[0]}: default {action.default!r}, "
                                               f"{cls.__name__}.{name} = {default!r}")
        assert flag(cls, name) in action.option_strings, f"{command}: {cls.__name__}.{name} is not {flag(cls, name)}"
        checked += 1
    assert checked > 150  # every command's settings, not a handful


def test_every_setting_option_comes_from_a_config_field():
    loose = sorted({f"{command} {a.option_strings[-1]}" for command, a in options()
                    if getattr(a, "config_field", None) is None and not set(a.option_strings) & NOT_SETTINGS})
    assert not loose, "options whose default lives outside a config dataclass: " + ", ".join(loose)


def test_help_is_the_fields_comment():
    p = argparse.ArgumentParser()
    add_config(p, TrainConfig)
    lr = next(a for a in p._actions if "--lr" in a.option_strings)
    assert lr.help.startswith("Adam learning rate") and "%(default)s" in lr.help
    batch = next(a for a in p._actions if "--head-batch-size" in a.option_strings)
    assert "in a quarter of the optimizer steps" in batch.help  # a comment continued on the next line


def test_parsed_options_build_the_config():
    p = argparse.ArgumentParser()
    add_config(p, FinetuneConfig, exclude=("augment",))
    add_config(p, AugmentConfig)
    args = p.parse_args(["--lr", "1e-4", "--devices", "auto", "--no-pretrained", "--flip", "--blur", "1.5",
                         "--target-sensitivity", "0.97", "--threshold-method", "sensitivity"])
    cfg = build(FinetuneConfig, args, augment=build(AugmentConfig, args))
    assert (cfg.lr, cfg.devices, cfg.pretrained, cfg.target_sensitivity) == (1e-4, "auto", False, 0.97)
    assert cfg.augment == dataclasses.replace(AugmentConfig(), flip=True, blur=1.5)
    assert build(FinetuneConfig, p.parse_args([]), augment=AugmentConfig()) == FinetuneConfig()


@pytest.mark.parametrize("argv", [["--devices", "two"], ["--intensity", "sharp"], ["--lr", "fast"]])
def test_bad_values_are_refused_by_the_parser(argv, capsys):
    p = argparse.ArgumentParser()
    add_config(p, FinetuneConfig, exclude=("augment",))
    with pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_list_options_take_commas_or_repetition():
    from pneumoscan.bench.cli import BenchConfig

    p = argparse.ArgumentParser()
    add_config(p, BenchConfig)
    assert build(BenchConfig, p.parse_args(["--backbone", "a,b"])).backbone == ("a", "b")
    assert build(BenchConfig, p.parse_args(["--backbone", "a", "--backbone", "b"])).backbone == ("a", "b")
    assert build(BenchConfig, p.parse_args(["--size", "none,160"])).size == (None, 160)
    assert build(BenchConfig, p.parse_args([])).backbone == BenchConfig().backbone
