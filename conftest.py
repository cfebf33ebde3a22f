# Puts the project root on sys.path so tests import data/, models/, utils/ and the scripts.
# Plugins loaded here, at the root, before tests/conftest.py imports them, so that pytest rewrites their asserts:
# the run ends with its slowest tests and why each is slow; a test file's fixture folders go when it is done.
pytest_plugins = ("tests.slowest", "tests.fixture_folders")
