"""CI's jobs: every test module is sorted for the lowest-versions job (`tests/floors.py`), and each floor module gives
that job tests to run."""

import ast
from pathlib import Path

from floors import FLOOR_MODULES, OTHER_MODULES

TESTS = Path(__file__).parent


def marks_of(decorators: list[ast.expr]) -> set[str]:
    """The names X of the `pytest.mark.X` and `pytest.mark.X(...)` among `decorators` (or a `pytestmark` value)."""
    names = set()
    for decorator in decorators:
        node = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
            names.add(node.attr)
    return names


def param_marks_of(decorators: list[ast.expr]) -> set[str]:
    """The names X of the marks that `pytest.param(..., marks=...)` cases inside `decorators` carry."""
    names = set()
    for call in (node for decorator in decorators for node in ast.walk(decorator) if isinstance(node, ast.Call)):
        if isinstance(call.func, ast.Attribute) and call.func.attr == "param":
            for keyword in call.keywords:
                if keyword.arg == "marks":
                    values = keyword.value.elts if isinstance(keyword.value, ast.List | ast.Tuple) else [keyword.value]
                    names |= marks_of(values)
    return names


def lowest_versions_tests(source: str) -> list[str]:
    """The tests of a floor module's `source` that `pytest -m floors` runs (some case of them, if parametrized): those
    not marked slow (conftest marks them floors) and those marked floors, read from the markers of the functions,
    their `pytest.param` cases, their `Test*` classes and `pytestmark`."""
    tree = ast.parse(source)
    module_marks = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(name, "id", None) == "pytestmark" for name in node.targets):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            module_marks |= marks_of(values)
    selected = []

    def visit(body: list[ast.stmt], inherited: set[str]) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                visit(node.body, inherited | marks_of(node.decorator_list))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
                marks = inherited | marks_of(node.decorator_list)
                if "floors" in marks | param_marks_of(node.decorator_list) or "slow" not in marks:
                    selected.append(node.name)

    visit(tree.body, module_marks)
    return selected


def test_every_test_module_is_in_one_table_of_floors_py():
    modules = {path.stem for path in TESTS.glob("test_*.py")}
    assert not set(FLOOR_MODULES) & set(OTHER_MODULES)
    unsorted = modules - set(FLOOR_MODULES) - set(OTHER_MODULES)
    assert not unsorted, (
        f"add {sorted(unsorted)} to FLOOR_MODULES or OTHER_MODULES in tests/floors.py, with the reason"
    )
    gone = (set(FLOOR_MODULES) | set(OTHER_MODULES)) - modules
    assert not gone, f"tests/floors.py names modules that do not exist: {sorted(gone)}"


def test_every_floor_module_gives_the_lowest_versions_job_a_test():
    # A floor module whose tests are all slow, none marked floors, would check none of its dependencies' floors.
    idle = sorted(name for name in FLOOR_MODULES if not lowest_versions_tests((TESTS / f"{name}.py").read_text()))
    assert not idle, f"{idle}: mark the test that reaches the dependency @pytest.mark.floors, or move the module"


def test_the_marker_reader_sees_module_class_and_function_markers():
    source = """
import pytest
pytestmark = [pytest.mark.slow]
def test_slow(): ...
@pytest.mark.floors
def test_marked(): ...
@pytest.mark.parametrize("x", [1, pytest.param(2, marks=pytest.mark.floors)])
def test_one_case_marked(x): ...
@pytest.mark.parametrize("x", [1, pytest.param(2, marks=[pytest.mark.skip])])
def test_no_case_marked(x): ...
def helper(): ...
"""
    assert lowest_versions_tests(source) == ["test_marked", "test_one_case_marked"]
    source = """
import pytest
def test_fast(): ...
@pytest.mark.slow
@pytest.mark.parametrize("x", [1])
def test_slow(x): ...
@pytest.mark.slow
class TestSlow:
    def test_inside(self): ...
class TestFast:
    def test_inside(self): ...
"""
    assert lowest_versions_tests(source) == ["test_fast", "test_inside"]
