# Makes the project's packages (data, models, utils) importable from tests without installing.
