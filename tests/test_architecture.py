"""The import order of docs/architecture.md, read from the source: every import of a gradwatch module
(at module level or inside a function) goes to the same layer or one below, the core never imports a
training framework, and module-level imports have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "gradwatch"

#: Lowest first. A module is in the layer of the longest prefix of its name listed here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "files")),
    ("findings", ("findings",)),
    ("store", ("store",)),
    ("diagnose", ("diagnose",)),
    ("report", ("report",)),
    ("session", ("session", "shutdown", "finish", "sinks_hub", "sinks_window")),
    ("sinks", ("sinks",)),
    ("framework side", ("frameworks", "objects", "amp", "probe", "guards", "torch_step", "torch_stream", "watch",
                        "treatment", "surgery", "runner", "global_hooks", "script_clips", "trainer_hooks", "keras",
                        "keras_torch", "keras_compiled", "keras_sessions", "keras_treatment", "array_stream", "optax",
                        "optax_guards", "optax_layers", "optax_book",
                        "lightning", "transformers", "testing", "scenarios", "doctor", "doctor_advice",
                        "forensics", "forensics_replay")),
    ("entry points", ("cli", "__main__", "__init__")),
]
CORE = {"base", "findings", "store", "diagnose", "report", "session"}
FRAMEWORKS = ("torch", "keras", "tensorflow", "jax", "flax", "optax", "lightning", "pytorch_lightning",
              "transformers", "accelerate", "wandb", "mlflow")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int:
    first = name.split(".")[0]
    for i, (_, prefixes) in enumerate(LAYERS):
        if first in prefixes:
            return i
    raise AssertionError(f"gradwatch.{name} is in no layer of tests/test_architecture.py: add it (and to docs/architecture.md)")


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported absolute name without the 'gradwatch.' prefix or with its top package, line, at module level)."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    top_level = {id(n) for n in tree.body}
    # Imports inside `if TYPE_CHECKING:` or try/except at module level count as module level too.
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top_level |= {id(c) for c in ast.walk(n)}
    found = []
    for node in ast.walk(tree):
        level = id(node) in top_level
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                prefix = ".".join(["gradwatch", *base] if base != [""] else ["gradwatch"])
                target = f"{prefix}.{node.module}" if node.module else prefix
                if node.module is None:  # from . import x: each name is a module
                    found += [(f"{target}.{a.name}", node.lineno, level) for a in node.names]
                    continue
                found.append((target, node.lineno, level))
            else:
                found.append((node.module or "", node.lineno, level))
    return found


def sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def own(name: str) -> str | None:
    """'gradwatch.store' -> 'store'; None for other packages."""
    parts = name.split(".")
    if parts[0] != "gradwatch":
        return None
    rest = [p for p in parts[1:] if p]
    if not rest or not ((SRC / rest[0]).is_dir() or (SRC / f"{rest[0]}.py").exists()):
        return "__init__"  # the package itself, or a name defined in its __init__ (__version__)
    return ".".join(rest)


def test_every_import_goes_to_its_own_layer_or_below() -> None:
    wrong = []
    for path in sources():
        here = module_name(path) if path.name != "__init__.py" or path.parent != SRC else "__init__"
        for name, line, _ in imports(path):
            target = own(name)
            if target is None or target == "__init__":
                continue
            if layer_of(target) > layer_of(here):
                wrong.append(f"{path.relative_to(SRC)}:{line} ({LAYERS[layer_of(here)][0]}) imports gradwatch.{target} "
                             f"({LAYERS[layer_of(target)][0]})")
    assert not wrong, "imports against the layer order of docs/architecture.md:\n" + "\n".join(wrong)


def test_the_core_imports_no_training_framework() -> None:
    wrong = []
    for path in sources():
        here = module_name(path) if path.name != "__init__.py" or path.parent != SRC else "__init__"
        if LAYERS[layer_of(here)][0] not in CORE:
            continue
        for name, line, _ in imports(path):
            if name.split(".")[0] in FRAMEWORKS:
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    assert not wrong, "the core must run without training frameworks:\n" + "\n".join(wrong)


def test_module_level_imports_have_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for path in sources():
        here = module_name(path) if path.name != "__init__.py" or path.parent != SRC else "__init__"
        deps = set()
        for name, _, level in imports(path):
            target = own(name)
            if level and target is not None and target != here and not here.startswith(target + "."):
                # a submodule's import of its own package is the package's __init__ running first: not a cycle
                deps.add(target)
        graph[here] = deps
    modules = set(graph)

    def resolve(name: str) -> str | None:  # 'diagnose.rules' is a module; 'guards.Foo' would be its package
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {r for d in deps if (r := resolve(d)) and r != m} for m, deps in graph.items()}
    state: dict[str, int] = {}
    path_stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path_stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return path_stack[path_stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = 2
        path_stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("an import cycle at module level: " + " -> ".join(cycle))


INTEGRATIONS = ("lightning.py", "transformers.py", "keras.py", "keras_torch.py", "runner.py", "global_hooks.py",
                "script_clips.py",
                "trainer_hooks.py")


def private_names(*files: str) -> set[str]:
    """The underscore attributes that ``files`` give their objects (``self._streams = ...``)."""
    names = set()
    for f in files:
        for node in ast.walk(ast.parse((SRC / f).read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name) and node.value.id == "self"):
                names.add(node.attr)
    return names


def test_integrations_use_the_watchs_public_api() -> None:
    """Lightning, HF, Keras and the runner reach a Watch, its streams and probes through public names only
    (they may use their own private state: self._x)."""
    probe = [str(f.relative_to(SRC)) for f in sorted((SRC / "probe").glob("*.py"))]
    private = private_names("session.py", "torch_stream.py", "watch.py", "guards/base.py", *probe)
    assert {"_streams", "_writer", "_closed", "_guards"} <= private  # the scan sees the Watch's state
    wrong = []
    for f in INTEGRATIONS:
        for node in ast.walk(ast.parse((SRC / f).read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "hooks", "callback")):
                    wrong.append(f"{f}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.keyword) and node.arg and node.arg.startswith("_"):
                wrong.append(f"{f}:{node.lineno} {node.arg}=")
            if isinstance(node, ast.ImportFrom) and any(a.name.startswith("_") for a in node.names):
                wrong.append(f"{f}:{node.lineno} imports {[a.name for a in node.names if a.name.startswith('_')]}")
    assert not wrong, "integrations reaching into private state:\n" + "\n".join(wrong)
