"""``python -m autoselect_fast.eval``: print the directory of the offline lmms-eval tasks (for ``--include_path``)."""
from . import TASKS_DIR

print(TASKS_DIR)
