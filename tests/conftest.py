import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gc  # noqa: E402

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow  # noqa: E402,F401

import gradtrace  # noqa: E402,F401

# TensorFlow and Keras hold hundreds of thousands of long-lived objects: move them out of the cyclic
# collector's sight, so that collections (Python's own, as tests allocate) only walk what tests made
gc.freeze()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield


def pytest_collection_modifyitems(session, config, items):
    """Start the scenario processes of the collected tests now, so they run beside the suite."""
    # tests that read the time of real steps run last, on a machine the scenario processes have left
    items.sort(key=lambda item: item.get_closest_marker("quiet") is not None)
    if config.option.collectonly:
        return
    modules = {item.module.__name__.rsplit(".", 1)[-1] for item in items}
    # they run one at a time, in the order the suite reaches their tests (modules run alphabetically)
    if "test_distribute" in modules or "test_replay_matrix" in modules:
        from tests.test_distribute import start_scenarios as start_distribute

        start_distribute()
    if "test_process" in modules:
        from tests.test_process import start_scenarios

        start_scenarios()
    if "test_replay_matrix" in modules:
        from tests.test_replay_matrix import start_scenarios as start_matrix

        start_matrix()


def pytest_sessionfinish(session, exitstatus):
    from tests import background

    background.stop_all()
