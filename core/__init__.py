"""The floor every stage stands on: errors, the typed config, the command line, device choice, checkpoint
I/O, atomic file writes, the preprocessing contract, hardware readings and experiment tracking.

May import: nothing of the project's (standard library and third-party libraries only).
"""
