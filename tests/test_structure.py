"""The code's shape: no function in the library over 60 lines, none in the harness over 80.

A long function does several jobs at once; past these lengths, split it into helpers with one job
each. Nested functions count on their own, and their lines count in the enclosing one too.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = {"ctxjax": 60, "experiments": 80}

# Split pending: functions over the limit, left for the hubs' split (train, step, evaluate,
# checkpoint, the real-model harness). Each entry is (path, qualified name); remove it when its
# function is split (a stale entry fails the test).
SPLIT_PENDING = {
    ("ctxjax/evaluate.py", "evaluate_context"),
    ("ctxjax/step.py", "make_update_step"),
    ("ctxjax/step.py", "make_update_step.update"),
    ("ctxjax/train.py", "_train"),
    ("ctxjax/checkpoint.py", "Checkpointer.restore"),
    ("experiments/real_model.py", "collect"),
}


def function_lengths(path: pathlib.Path) -> dict[str, int]:
    """{qualified name: lines from `def` (decorators excluded) to the last line} of every
    function and method in the file, nested ones named `outer.inner`."""
    lengths = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return lengths


def over_limit(package: str) -> dict[tuple[str, str], int]:
    """{(path relative to the repository, qualified name): lines} of the functions under
    `package` longer than its limit."""
    limit = MAX_LINES[package]
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for name, lines in function_lengths(path).items():
            if lines > limit:
                found[(rel, name)] = lines
    return found


def test_function_lengths_count_nested_functions_and_methods(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "def f():\n"
        "    def g():\n"
        "        return 1\n"
        "\n"
        "    return g\n"
        "\n"
        "\n"
        "class C:\n"
        "    @staticmethod\n"
        "    def m(x):\n"
        "        return x\n"
    )
    assert function_lengths(src) == {"f": 5, "f.g": 2, "C.m": 2}


@pytest.mark.parametrize("package", sorted(MAX_LINES))
def test_no_function_over_the_length_limit(package):
    found = over_limit(package)
    offenders = sorted(
        f"{path}:{name} ({lines} lines)"
        for (path, name), lines in found.items()
        if (path, name) not in SPLIT_PENDING
    )
    assert not offenders, (
        f"functions over {MAX_LINES[package]} lines in {package}/ (split them into helpers with "
        "one job each): " + "; ".join(offenders)
    )


def test_split_pending_entries_are_still_over_the_limit():
    found = {key for package in MAX_LINES for key in over_limit(package)}
    stale = sorted(f"{path}:{name}" for path, name in SPLIT_PENDING - found)
    assert not stale, "split now, remove from SPLIT_PENDING: " + "; ".join(stale)
