"""Task-based evaluation of checkpoints (`lmforge eval`): task files, metrics, runners, reports.

    from lmforge.eval import evaluate, load_task
    evaluate("runs/demo/model", ["runs/demo/tasks"], "runs/demo/eval")
"""

from lmforge.eval.run import evaluate
from lmforge.eval.tasks import KINDS, Task, load_task

__all__ = ["KINDS", "Task", "evaluate", "load_task"]
