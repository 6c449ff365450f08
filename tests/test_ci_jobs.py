"""CI's jobs: every test module is sorted for the lowest-versions job (`tests/floors.py`)."""

from pathlib import Path

from floors import FLOOR_MODULES, OTHER_MODULES


def test_every_test_module_is_in_one_table_of_floors_py():
    modules = {path.stem for path in Path(__file__).parent.glob("test_*.py")}
    assert not set(FLOOR_MODULES) & set(OTHER_MODULES)
    unsorted = modules - set(FLOOR_MODULES) - set(OTHER_MODULES)
    assert not unsorted, (
        f"add {sorted(unsorted)} to FLOOR_MODULES or OTHER_MODULES in tests/floors.py, with the reason"
    )
    gone = (set(FLOOR_MODULES) | set(OTHER_MODULES)) - modules
    assert not gone, f"tests/floors.py names modules that do not exist: {sorted(gone)}"
