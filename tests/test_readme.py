"""The README documents every config field and the CLI flags that exist."""

import dataclasses
from pathlib import Path

from swarmloco.cli import build_parser
from swarmloco.config import RunConfig

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_config_field_is_documented() -> None:
    cfg = RunConfig()
    missing = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        names = [x.name for x in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else [f.name]
        missing += [n for n in names if f"`{n}`" not in README]
    assert not missing, f"README lacks config fields: {missing}"


def test_every_run_flag_is_documented() -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    flags = [opt for a in run._actions for opt in a.option_strings
             if opt.startswith("--") and a.help != "==SUPPRESS==" and opt not in ("--help",)]
    missing = [f for f in flags if f"`{f}" not in README]
    assert not missing, f"README lacks run flags: {missing}"
