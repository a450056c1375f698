"""lm-evaluation-harness tasks shipped with skipgpt (they need no Hugging Face hub).

``TASK_DIR`` is passed to lm-eval's ``TaskManager(include_path=...)`` by
:func:`skipgpt.evaluation.evaluate_lm`; ``LOCAL_TASKS`` lists the task names found there.
"""

from __future__ import annotations

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("skipgpt_nextline",)
