# Puts the project root on sys.path so tests import data/, models/, utils/ and the scripts.
