"""The folder layout is a picture of the architecture: lower layers never import higher ones.

Every import statement of every module under ``mmdiff/`` and ``demo/`` is read (module level,
inside functions and inside classes alike; ``if TYPE_CHECKING:`` blocks excepted, since they never
run), resolved to an mmdiff module, and checked against :data:`LAYERS`. The test fails on an
upward import or on any import cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: lowest first; a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("mmdiff.registry", "mmdiff.io", "mmdiff.options", "mmdiff.special_tokens", "mmdiff.media",
                    "mmdiff.tokenizer", "mmdiff.tasks.prompts")),
    ("decoder", ("mmdiff.decoder", "mmdiff.flops", "mmdiff.losses")),
    ("components", ("mmdiff.sampling", "mmdiff.encoders", "mmdiff.adapters")),
    ("model", ("mmdiff.model",)),
    ("loading", ("mmdiff.checkpoints", "mmdiff.loading")),
    ("tasks", ("mmdiff.tasks",)),
    ("search", ("mmdiff.search",)),
    ("serving", ("mmdiff.serving",)),
    ("data", ("mmdiff.data",)),
    ("evaluation", ("mmdiff.evaluation",)),
    ("training", ("mmdiff.training",)),
    ("entry points", ("mmdiff", "mmdiff.__main__", "mmdiff.cli", "mmdiff.commands", "mmdiff.data.cli",
                      "mmdiff.evaluation.cli", "mmdiff.evaluation.lmms_eval_plugin", "mmdiff.training.cli",
                      "mmdiff.serving.server")),
    ("demo", ("demo",)),
]


def modules() -> dict[str, Path]:
    out = {}
    for top in ("mmdiff", "demo"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The mmdiff / demo modules that ``name`` imports anywhere in its file."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent) + (f".{node.module}" if node.module else "")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t not in known and "." in t:
                t = t.rpartition(".")[0]
            if t in known and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_upward_import():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in graph().items() for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The walk must catch a function-level import, the way cycles used to hide."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .checkpoints import load\n")
    assert imports("mmdiff.decoder", src, {"mmdiff.decoder": src, "mmdiff.checkpoints": src}) == {"mmdiff.checkpoints"}
