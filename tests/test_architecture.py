"""The package's shape, enforced: a layered import graph, no lorakit import inside a function, no
private name used outside its module, one dispatch on layer types (the kinds table), variants as
objects. Read from the source with `ast`, as import-linter's layers contract would (imports under
`if TYPE_CHECKING:` are type hints only and are not counted)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"

# Each module imports only from modules in lower layers (a layer's modules are independent of
# each other). Applications (train, serve, cli) may import anything below and their own package.
LAYERS = [
    ["errors"],
    ["core", "kinds", "ops", "patterns", "files", "progress"],
    ["config"],
    ["init", "dora"],
    ["variants"],
    ["layer"],
    ["params"],
    ["tokens"],
    ["inject"],
    ["adapters"],
    ["merge"],
    ["io"],
    ["batch"],
    ["bank"],
    ["arithmetic", "quant", "optim", "hotswap"],
    ["integrations"],  # transformers / TRL trainers (imported lazily) on the public API above
    ["models"],
    ["lorakit"],  # the package itself: the public API
]
APPS = ("train", "serve", "cli")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return (SRC.parent / name.replace(".", "/") / "__init__.py").is_file()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.Module, module: str, top_only: bool):
    """(node, imported lorakit module, names) for the module's lorakit imports."""
    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom):
                target = _resolve(module, child)
                if target == "lorakit" or target.startswith("lorakit."):
                    names = [a.name for a in child.names]
                    # `from . import core`: the imported names are modules
                    if all(f"{target}.{n}" in MODULES for n in names):
                        for n in names:
                            yield child, f"{target}.{n}", [], top
                    else:
                        yield child, target, names, top
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name == "lorakit" or a.name.startswith("lorakit."):
                        yield child, a.name, [], top
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from visit(child, inner)
    for item in visit(tree, True):
        if not top_only or item[3]:
            yield item[:3]


def _short(name: str) -> str:
    return name.removeprefix("lorakit.") if name != "lorakit" else "lorakit"


def _layer_of(name: str) -> int:
    short = _short(name)
    for i, layer in enumerate(LAYERS):
        if short in layer:
            return i
    if short.split(".")[0] in APPS:
        return len(LAYERS)
    raise AssertionError(f"module {name} is in no layer of LAYERS: place it")


def test_every_module_has_a_layer():
    for name in MODULES:
        if _short(name) not in ("__main__", "cli.__main__"):
            _layer_of(name)


def test_imports_go_down_the_layers_only():
    bad = []
    for name, tree in MODULES.items():
        if _short(name) in ("__main__", "cli.__main__"):
            continue
        mine = _layer_of(name)
        for node, target, _, in _imports(tree, name, top_only=True):
            theirs = _layer_of(target)
            if mine == len(LAYERS):  # an application: anything below, or its own package
                same_app = _short(target).split(".")[0] == _short(name).split(".")[0]
                ok = theirs < mine or same_app or _short(target).split(".")[0] in APPS and _short(name).startswith("cli")
            else:
                ok = theirs < mine
            if not ok:
                bad.append(f"{_short(name)}:{node.lineno} imports {_short(target)}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_lorakit_import_inside_a_function():
    inner = [f"{_short(name)}:{node.lineno} imports {_short(target)}"
             for name, tree in MODULES.items()
             for node, target, _ in _imports(tree, name, top_only=False)
             if node not in {n for n, _, _ in _imports(tree, name, top_only=True)}]
    assert not inner, "lorakit imports inside functions (a hidden cycle):\n" + "\n".join(inner)


def test_no_private_name_crosses_a_module():
    bad = []
    for name, tree in MODULES.items():
        aliases = {}
        for node, target, names in _imports(tree, name, top_only=False):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{_short(name)}:{node.lineno} imports {_short(target)}.{n}")
            if not names:  # a module bound to a name: `from . import kinds`, `import lorakit.io as x`
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[-1]] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{_short(name)}:{node.lineno} uses {_short(aliases[node.value.id])}.{node.attr}")
    assert not bad, "private names used outside their module:\n" + "\n".join(bad)


def test_the_graph_has_no_cycle():
    graph = {name: {t for _, t, _ in _imports(tree, name, top_only=False) if t in MODULES}
             for name, tree in MODULES.items()}
    done, path = set(), []

    def visit(n):
        if n in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
        if n in done:
            return
        path.append(n)
        for m in graph[n]:
            if m != n and not (n.startswith(m + ".") or m == "lorakit" and n.startswith("lorakit.cli")):
                visit(m)
        path.pop()
        done.add(n)

    for n in graph:
        if _short(n) not in ("lorakit",):
            visit(n)


def _source(name: str) -> str:
    path = SRC.parent / (name.replace(".", "/") + ".py")
    return path.read_text() if path.is_file() else (SRC.parent / name.replace(".", "/") / "__init__.py").read_text()


@pytest.mark.parametrize("pattern, home", [
    ("kind.name ==", ()), (".project is", ()), ("__qualname__", ("kinds",)),  # the kinds table is the one dispatch
    ("lora_magnitude_vector", ("dora",)), ("use_dora", ("config", "variants", "arithmetic", "cli.inspect")),
    ("no adapter named", ("layer",)),  # one require_adapter
    ("IGNORE = -100", ("train.data",)),
    ("os.rename(", ("files",)),  # folders switched into place in one module
])
def test_one_home_per_rule(pattern, home):
    where = [_short(n) for n in MODULES if pattern in _source(n) and _short(n) not in home]
    assert not where, f"{pattern!r} appears outside {home}: {where}"
