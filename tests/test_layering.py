"""Which way imports point (../shared/STYLE.md, "Layers"): no import circle between qconvert's
modules -- counting imports inside functions too -- and no codec (blocks/) or reader
(sources/) importing a method (methods/). Knowledge of model families stays in arch/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qconvert"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> qconvert modules it imports anywhere in its text (the package facade
    ``qconvert`` itself, imported for ``__version__``, is left out)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                deps.update(subs or [target])
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = {d for d in deps if d in modules and d not in (mod, "qconvert")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_codecs_and_readers_import_no_method():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith("qconvert.methods"))
           for m, deps in graph.items() if m.startswith(("qconvert.blocks", "qconvert.sources", "qconvert.container"))}
    assert {m: d for m, d in bad.items() if d} == {}


_TENSOR_NAME = re.compile(r"[\w.{}]*\b(self_attn|mlp|block_sparse_moe|attention|blk|layers|model)\.[\w.{}]*(proj|norm|weight|bias|attn_\w+|ffn_\w+)[\w.]*")


def test_no_family_tensor_names_outside_arch():
    """Tensor names of model families (``model.layers.0.self_attn.q_proj.weight``,
    ``blk.0.attn_q.weight``, ``mlp.down_proj``) appear as string values only in qconvert/arch/."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "arch" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _TENSOR_NAME.fullmatch(node.value):
                offenders.append(f"{path.relative_to(PACKAGE)}: {node.value!r}")
    assert offenders == []


def test_tensor_name_pattern_recognises_names():
    for name in ("model.layers.0.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "mlp.down_proj.weight"):
        assert _TENSOR_NAME.fullmatch(name), name
    assert not _TENSOR_NAME.fullmatch("REGEX=TYPE per-tensor override, e.g. 'down_proj=q8_0'")
