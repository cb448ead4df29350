"""Which tests need torch (the ``torch`` marker), read off the code instead of guessed from a test
module's globals.

A test needs torch when running it imports torch, torchvision or open_clip: directly, or through
a clipinspect module that imports them when it is imported (followed through the package's
module-level imports, without importing anything), in the test function, in the fixtures it
uses, or in the helpers of the tests folder it calls. A test whose need is hidden further
(a command that imports the exporter when it runs) carries ``@pytest.mark.torch`` itself; the
torch-free install (``pip install -e ".[cpu,dev]"``) is the check that none is missed.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import textwrap
from functools import lru_cache
from pathlib import Path

TORCH_MODULES = ("torch", "torchvision", "open_clip")
TESTS = Path(__file__).resolve().parent


def _is_torch(module: str) -> bool:
    return module.split(".")[0] in TORCH_MODULES


@lru_cache(maxsize=None)
def module_file(module: str) -> Path | None:
    """The source of a clipinspect module or of a helper module in the tests folder, found
    without importing it; None for any other module."""
    parts = module.split(".")
    if parts[0] != "clipinspect":
        helper = TESTS / f"{module}.py"
        return helper if len(parts) == 1 and helper.is_file() else None
    if len(parts) < 2:
        return None
    try:  # imports the 'clipinspect' namespace only, not the subpackage
        spec = importlib.util.find_spec(".".join(parts[:2]))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts[2:])
    for candidate in (folder / "__init__.py", folder.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _names(node: ast.Import | ast.ImportFrom, module: str = "", is_package: bool = False):
    """The modules an import statement may import (``from a import b``: ``a`` and ``a.b``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = _absolute(node, module, is_package)
    return [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]


def _optional(handler: ast.ExceptHandler) -> bool:
    """An ``except`` that catches a missing module: its ``try`` body is optional."""
    names = ast.unparse(handler.type) if handler.type is not None else "BaseException"
    return any(n in names for n in ("ImportError", "ModuleNotFoundError", "Exception"))


def eager_imports(body: list[ast.stmt], module: str, is_package: bool):
    """The modules a module body imports when it runs: not those inside functions, under
    ``if TYPE_CHECKING:``, or in a ``try`` that catches ImportError."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield from _names(node, module, is_package)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from eager_imports(node.orelse, module, is_package)
        elif isinstance(node, ast.Try):
            if not any(_optional(h) for h in node.handlers):
                yield from eager_imports(node.body, module, is_package)
            yield from eager_imports(node.orelse + node.finalbody, module, is_package)
        else:
            for field in ("body", "orelse", "finalbody"):
                yield from eager_imports(getattr(node, field, None) or [], module, is_package)


@lru_cache(maxsize=None)
def _edges(module: str) -> tuple[str, ...]:
    """What importing ``module`` imports first: its parent packages, its eager imports."""
    parts = module.split(".")
    parents = [".".join(parts[:i]) for i in range(2, len(parts))]
    path = module_file(module)
    if path is None:
        return tuple(parents)
    tree = ast.parse(path.read_text(), str(path))
    return (*parents, *eager_imports(tree.body, module, path.name == "__init__.py"))


@lru_cache(maxsize=None)
def module_needs_torch(module: str) -> bool:
    """Whether importing ``module`` imports torch (followed through everything it imports)."""
    seen, todo = {module}, [module]
    while todo:
        current = todo.pop()
        if _is_torch(current):
            return True
        for other in _edges(current):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return False


@lru_cache(maxsize=None)
def _file_tree(filename: str) -> ast.Module | None:
    try:
        return ast.parse(Path(filename).read_text(), filename)
    except (OSError, SyntaxError, ValueError):
        return None


@lru_cache(maxsize=None)
def _definitions(filename: str) -> dict[int, ast.AST]:
    """{first line (its ``def`` or first decorator): function node} of one file, parsed once."""
    found = {}
    for node in ast.walk(_file_tree(filename) or ast.Module(body=[], type_ignores=[])):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.lineno] = node
            if node.decorator_list:
                found[node.decorator_list[0].lineno] = node
    return found


def _source_tree(obj) -> ast.AST | None:
    code = getattr(inspect.unwrap(obj), "__code__", None)
    if code is not None:  # a function: found in its file's tree, no re-parsing
        return _definitions(code.co_filename).get(code.co_firstlineno)
    if inspect.ismodule(obj):
        return _file_tree(obj.__file__) if getattr(obj, "__file__", None) else None
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):
        return None


@lru_cache(maxsize=None)
def _file_in_tests(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(TESTS)


def _in_tests(obj) -> bool:
    code = getattr(obj, "__code__", None)
    try:
        return _file_in_tests(code.co_filename if code is not None else inspect.getfile(obj))
    except TypeError:
        return False


_CODE: dict[object, bool] = {}  # by the object itself: an id could be reused


def _importorskips_torch(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
            and bool(node.args) and isinstance(node.args[0], ast.Constant)
            and _is_torch(str(node.args[0].value)))


def code_needs_torch(obj) -> bool:
    """Whether running the function (or class) ``obj`` of the tests folder imports torch: any
    import in it, any ``pytest.importorskip`` of a torch module, and the same for the
    functions and classes of the tests folder it names. Computed once per object."""
    if obj not in _CODE:
        _CODE[obj] = False  # while it is being read: a helper naming it back adds nothing
        _CODE[obj] = _code_needs_torch(obj)
    return _CODE[obj]


def _code_needs_torch(obj) -> bool:
    tree = _source_tree(obj)
    if tree is None:
        return False
    scope = getattr(obj, "__globals__", None) or vars(inspect.getmodule(obj) or object)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(module_needs_torch(m) for m in _names(node)):
                return True
        elif _importorskips_torch(node):
            return True
        elif isinstance(node, ast.Name) and node.id in scope:
            named = scope[node.id]
            if ((inspect.isfunction(named) or inspect.isclass(named)) and _in_tests(named)
                    and code_needs_torch(named)):
                return True
    return False


_MODULES: dict[str, bool] = {}


def suite_module_needs_torch(module) -> bool:
    """A test module that imports torch or a torch-importing module at its top level (with
    ``pytest.importorskip``, or its collection fails without torch). Computed once."""
    name = module.__name__
    if name not in _MODULES:
        tree = _source_tree(module)
        top = [] if tree is None else [n for n in tree.body if not isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        _MODULES[name] = (
            any(inspect.ismodule(v) and _is_torch(v.__name__) for v in vars(module).values())
            or any(_importorskips_torch(n) for stmt in top for n in ast.walk(stmt))
            or any(module_needs_torch(m) for m in eager_imports(top, name, False)))
    return _MODULES[name]


def item_needs_torch(item) -> bool:
    """A collected test: its module, its function, or a fixture it uses needs torch."""
    module = getattr(item, "module", None)
    if module is not None and suite_module_needs_torch(module):
        return True
    function = getattr(item, "function", None)
    if function is not None and code_needs_torch(function):
        return True
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fixturedef in (info.name2fixturedefs.get(name, ()) if info is not None else ()):
            func = getattr(fixturedef, "func", None)
            if func is not None and _in_tests(func) and code_needs_torch(func):
                return True
    return False
