"""The package's modules depend on each other in one direction only.

The import graph is drawn from the source (`ast`: every `import` and
`from ... import`, inside functions too, since a late import is still a
dependency), over every module of `mergekit_cabs`; a package's
`__init__` counts as the module of its own name.  It must have no cycle,
and inside `tune/` every import goes from a layer to the same or a lower
one (docs/contributing.md draws them)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mergekit_cabs"

# tune/'s layers, lowest first: a module may import its own layer's (without
# a cycle) and lower ones', never a higher one's.
TUNE_LAYERS = (
    ("options", "groups"),  # the settings, the error type, the file names; the layer groups
    ("rows", "text", "chat", "choice", "lmeval", "data", "smooth"),  # the data: shared helpers, the kinds, dispatch
    ("objective", "compare"),  # losses -> gains -> the score; the paired bootstrap
    ("store", "config", "gradient"),  # the merged tensors in the live model; the YAML's numbers; their slopes
    ("search", "gradsearch"),  # the searches: coordinate, CMA-ES, gradient
    ("prepare", "references", "live"),  # checked inputs; the references' scores; the live model and one point
    ("settings", "baselines"),  # what is searched: cabs's settings, the baselines
    ("run",),  # the phases in order
    ("report", "outputs"),  # console; tune.md, the plot and the files
    ("__init__",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(tree: ast.AST, here: str, known: dict[str, Path]) -> set[str]:
    """The package's modules `tree` imports (a name imported from a package is
    that submodule when one exists, else the package itself)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here.split(".")[: len(here.split(".")) - node.level + (here in PACKAGES)]
                base = ".".join(package + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known and n != here)
    return out


PACKAGES = {module_name(p) for p in PACKAGE.rglob("__init__.py")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(ast.parse(path.read_text(encoding="utf-8")), name, known) for name, path in known.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (its modules in order), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def tune_layer(name: str) -> int | None:
    short = name.removeprefix("mergekit_cabs.tune").lstrip(".") or "__init__"
    return next((i for i, layer in enumerate(TUNE_LAYERS) if short in layer), None)


def test_the_package_import_graph_has_no_cycle():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found)


def test_every_tune_module_has_a_layer():
    tune = [n for n in modules() if n == "mergekit_cabs.tune" or n.startswith("mergekit_cabs.tune.")]
    assert [n for n in tune if tune_layer(n) is None] == []


def test_no_tune_module_imports_a_higher_layer():
    upward = [f"{a} -> {b}" for a, targets in graph().items() if tune_layer(a) is not None
              for b in targets if tune_layer(b) is not None and tune_layer(b) > tune_layer(a)]
    assert upward == []


def test_the_cycle_finder_finds_a_cycle_and_the_layer_check_an_upward_import():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert tune_layer("mergekit_cabs.tune.run") > tune_layer("mergekit_cabs.tune.search")
