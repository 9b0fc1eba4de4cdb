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


def _llama_cpp_tier() -> set[str]:
    """Tests that need llama.cpp itself (llama-cpp-python or its libggml-base)."""
    import ast

    tier = set()
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if path.name == "test_repo.py":
            continue
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                body = ast.get_source_segment(source, node) or ""
                args = {a.arg for a in node.args.args}
                if "ggml_quantize" in args or re.search(r"_llama_cpp\(\)|importorskip\(\s*\"llama_cpp\"", body):
                    tier.add(f"{path.name}::{node.name}")
    return tier


def test_readme_names_every_test_a_fresh_machine_skips_for_llama_cpp():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## What a fresh machine does not check", 1)[1].split("\n## ", 1)[0]
    tier = _llama_cpp_tier()
    assert len(tier) >= 4
    for test in tier:
        file, name = test.split("::")
        assert f"{file}::{name}" in section or (file in section and f"::{name}" in section), test
    # and the test extra really leaves it out (CI installs `.[test]`)
    extras = re.search(r"^test = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), re.S | re.M).group(1)
    assert "llama-cpp-python" not in extras and "llama_cpp" not in extras
