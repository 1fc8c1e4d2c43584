"""The README's configuration reference is the schema's, and its commands exist."""

from __future__ import annotations

import re

from kd.cli import COMMANDS
from kd.config import reference_markdown
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_config_reference_matches_schema() -> None:
    match = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->",
                      README, flags=re.S)
    assert match, "README lost its config-reference markers"
    assert match.group(1) == reference_markdown(), (
        "README config reference is stale: regenerate it with `kd config --reference`")


def test_documented_commands_exist() -> None:
    documented = set(re.findall(r"`kd (\w[\w-]*)", README))
    assert documented <= set(COMMANDS), documented - set(COMMANDS)
    assert {"train", "config", "eval", "export"} <= documented


def test_install_and_test_commands_match_ci() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in README and 'pip install -e ".[dev]"' in ci
    assert re.search(r"^pytest$", ci, flags=re.M) and "```bash\npytest\n```" in README
