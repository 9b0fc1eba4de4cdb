"""The repository's promises: README's commands are what CI runs."""

from __future__ import annotations

import re

from tests.conftest import REPO


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = _bash_blocks(readme)
    install_and_run, test_command = blocks[0], blocks[1]
    assert "qconvert quantize" in install_and_run and "qconvert inspect" in install_and_run
    # the first command works anywhere: the packaged demo model, not ../shared (test_packaging runs it)
    assert "demo:stories260K" in install_and_run and "qconvert run" in install_and_run
    assert "../shared" not in install_and_run
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
