# Puts the project root on sys.path so tests import data/, models/, utils/ and the scripts.
# The run ends with its slowest tests and why each is slow (loaded here, at the root, before tests/conftest.py
# imports it, so that pytest rewrites its asserts).
pytest_plugins = ("tests.slowest",)
