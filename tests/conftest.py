import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


def pytest_collection_modifyitems(session, config, items):
    """Start the scenario processes of the collected tests now, so they run beside the suite."""
    if config.option.collectonly:
        return
    modules = {item.module.__name__.rsplit(".", 1)[-1] for item in items}
    if "test_process" in modules:
        from tests.test_process import start_scenarios

        start_scenarios()
    if "test_distribute" in modules:
        from tests.test_distribute import start_scenarios as start_distribute

        start_distribute()


def pytest_sessionfinish(session, exitstatus):
    from tests import background

    background.stop_all()
