"""Functions of ``lede_env`` and ``agents`` are at most :data:`MAX_LINES` lines long.

A function's length is the lines of its ``def`` node, from the ``def`` line (decorators not
counted) to its last line, less the lines of its docstring: the signature counts (a typer
command's option declarations too), the documentation does not. Every function and method is
measured, nested ones included (a nested function's lines also count in the one around it), and
named ``path:qualname`` with Python's ``__qualname__`` spelling (``Class.method``,
``outer.<locals>.inner``). :data:`ALLOWED` lists the few exceptions, each with its reason.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lede_env", "agents")
MAX_LINES = 80

#: ``"path:qualname": reason`` of each function allowed to be longer
ALLOWED: dict[str, str] = {}  # none today: LEDEEnv.__init__ (118 lines) became a TaskConfig constructor


def _docstring_lines(node: ast.AST) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0].end_lineno - body[0].lineno + 1
    return 0


def function_lengths(path: Path) -> dict[str, int]:
    """``{qualname: lines}`` of every function in the module at ``path`` (see the module docstring)."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out[name] = child.end_lineno - child.lineno + 1 - _docstring_lines(child)
                visit(child, name + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), str(path)), "")
    return out


def all_function_lengths() -> dict[str, int]:
    """``{"path:qualname": lines}`` over every module of :data:`PACKAGES`."""
    return {f"{path.relative_to(ROOT).as_posix()}:{name}": n
            for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
            for name, n in function_lengths(path).items()}


def test_the_measure_skips_decorators_and_docstrings_and_counts_nested_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('@decorator\ndef f(a,\n      b):\n    """Doc\n    string."""\n    def g():\n        return 1\n'
                   '    return g\n\n\nclass C:\n    def m(self):\n        pass\n')
    assert function_lengths(src) == {"f": 5, "f.<locals>.g": 2, "C.m": 2}


def test_functions_are_at_most_80_lines():
    lengths = all_function_lengths()
    assert len(lengths) > 500  # the walk found the packages' modules
    too_long = [f"{name} {n} lines" for name, n in sorted(lengths.items()) if n > MAX_LINES and name not in ALLOWED]
    assert not too_long, (f"functions over {MAX_LINES} lines (split them into helpers, or add them to ALLOWED with "
                          "the reason):\n" + "\n".join(too_long))


def test_the_allow_list_is_short_and_current():
    lengths = all_function_lengths()
    assert len(ALLOWED) <= 5
    for name, reason in ALLOWED.items():
        assert reason.strip(), name
        assert name in lengths, f"{name} in ALLOWED no longer exists: drop it"
        assert lengths[name] > MAX_LINES, f"{name} is {lengths[name]} lines now: drop it from ALLOWED"
