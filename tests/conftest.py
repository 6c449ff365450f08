import os
import tempfile

# Nothing may download: the Hub is switched off for the whole suite, and remote code goes to a scratch cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="vlmheads-modules-")

import pytest  # noqa: E402
import torch  # noqa: E402
from floors import FLOOR_MODULES  # noqa: E402
from orion_helpers import FAMILIES, make_processor  # noqa: E402

# Under pytest-xdist (`-n 2`) each worker has one core: torch's own thread pool would make the workers fight over both.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast tests of the modules that call the dependencies' APIs run in CI's lowest-versions job (`floors.py`)."""
    for item in items:
        if item.path.stem in FLOOR_MODULES and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.floors)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="session")
def shared_processors():
    """Orion processors over the real Qwen2-VL tokenizer, built once per family; tests must not change them."""
    built = {}

    def get(family):
        if family.name not in built:
            built[family.name] = make_processor(family)
        return built[family.name]

    return get


@pytest.fixture
def processor(family, shared_processors):
    return shared_processors(family)


@pytest.fixture(scope="module")
def engine():
    """A tiny `LocalEngine` (the embedded Orion model) shared by one test module's requests."""
    from serve_helpers import tiny_engine

    engine = tiny_engine()
    yield engine
    engine.close(drain=False)
