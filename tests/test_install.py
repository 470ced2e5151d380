"""README's install is CI's install: .ci/run runs the README's install lines, word for word."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_install_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "README's Install section has no bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_install_lines():
    lines = _readme_install_lines()
    assert lines and all(line.startswith("pip install ") for line in lines)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_installs = [line for line in ci if line.startswith("pip install ")]
    assert ci_installs == lines
    assert "download.pytorch.org" not in (ROOT / ".ci" / "run").read_text()


def test_the_test_extra_names_what_the_tests_import():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        return
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower() for req in extras["test"]}
    assert {"pytest", "attrs", "lm-eval", "sentence-transformers", "matplotlib"} <= names
