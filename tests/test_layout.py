"""The package's layout: no import cycle anywhere in aim/, and the library (aim.nn, aim.analysis,
aim.data, aim.config, aim.checkpoint, aim.distributed) never imports the application (aim.app).
Every import counts, also those inside functions: a cycle that runs only on use is a cycle.
(``python -m aim``, aim/__main__.py, is the command's entry point.)"""
import ast
import pathlib

import aim

PACKAGE = pathlib.Path(aim.__file__).parent


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from aim.app import study" imports the module aim.app.study
                targets.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                               for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_library_does_not_import_the_application():
    graph = import_graph()
    library = [name for name in graph if name not in ("aim", "aim.__main__") and not name.startswith("aim.app")]
    assert {"aim.nn.model", "aim.analysis.audit", "aim.data", "aim.config", "aim.checkpoint", "aim.distributed"} <= set(library)
    offenders = {name: sorted(t for t in graph[name] if t.startswith("aim.app")) for name in library}
    assert not {k: v for k, v in offenders.items() if v}
    assert not any(t.startswith("aim.app") for t in graph["aim"])  # `import aim` loads no command code
