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
    if not config.option.collectonly and any(item.module.__name__.endswith("test_process") for item in items):
        from tests.test_process import start_scenarios

        start_scenarios()


def pytest_sessionfinish(session, exitstatus):
    from tests import background

    background.stop_all()
