"""The package's import graph: no cycles, and each layer imports only the layers below it.

Every ``import`` counts, also one inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "rlhf_lit"

# Lower layers first; a module may import modules of its own layer or of lower ones.
LAYERS = [
    ("leaves", ["rlhf_lit", "rlhf_lit.chat", "rlhf_lit.markdown", "rlhf_lit.atomic_files", "rlhf_lit.demo_assets",
                "rlhf_lit.paths", "rlhf_lit.tokenizer", "rlhf_lit.errors", "rlhf_lit.text_files",
                "rlhf_lit.run_lock", "rlhf_lit.checkpoint_io", "rlhf_lit.demo_survey"]),
    ("algos", ["rlhf_lit.algos"]),
    ("model", ["rlhf_lit.model"]),
    ("components", ["rlhf_lit.rollout", "rlhf_lit.rewards", "rlhf_lit.data", "rlhf_lit.preference_data",
                    "rlhf_lit.export", "rlhf_lit.run_logging", "rlhf_lit.checkpointing", "rlhf_lit.evaluation",
                    "rlhf_lit.testing", "rlhf_lit.predictions", "rlhf_lit.run_folder", "rlhf_lit.rollout_limit",
                    "rlhf_lit.interrupts", "rlhf_lit.parallel"]),
    ("stages", ["rlhf_lit.stages"]),
    ("cli", ["rlhf_lit.cli", "rlhf_lit.__main__", "rlhf_lit.console", "rlhf_lit.cli_checks"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every rlhf_lit module ``path`` imports (resolved to a module file of the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            if n.startswith("rlhf_lit") and resolve(n) is not None:
                out.add(resolve(n))
    out.discard(me)
    return out


def resolve(name: str) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        p = PKG.parent.joinpath(*parts)
        if p.with_suffix(".py").is_file() or (p / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS in tests/test_layout.py"
    return rank


def test_no_import_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_only_downwards():
    bad = []
    for module, deps in graph().items():
        if module == "rlhf_lit":
            continue
        for dep in deps:
            if layer_of(dep) > layer_of(module):
                bad.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not bad, "\n".join(sorted(bad))


def test_algos_is_pure_tensor_maths():
    for path in (PKG / "algos").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for m in mods:
                top = m.split(".")[0]
                assert top in {"torch", "__future__", "typing", "dataclasses", "math", "rlhf_lit", "collections"}, \
                    f"{path.name} imports {m}: algos/ is tensors only"
                assert top != "rlhf_lit" or m.startswith("rlhf_lit.algos"), f"{path.name} imports {m}"


def test_every_module_compiles_without_warnings():
    """No SyntaxWarning (an invalid escape sequence in a docstring, say) printed by every process
    that imports the package."""
    import warnings

    for path in sorted(PKG.rglob("*.py")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
