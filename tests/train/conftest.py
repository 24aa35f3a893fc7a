import pytest
from launch_util import python_prepare_cmd, run


@pytest.fixture(scope="session")
def ftlm_cache(tmp_path_factory):
    """An FTLM_CACHE folder with the embedded corpus prepared once, shared by every training test."""
    cache = tmp_path_factory.mktemp("ftlm_cache")
    run(python_prepare_cmd(), cache)
    return cache
