"""Diagnose a training run from its curves: `lmforge diagnose RUN_DIR`, and a live warning at evals.

Reads `metrics.jsonl` (one record per step: `loss`, `grad_norm`, ...; eval steps add `val_loss`
and `train_eval_loss`, the train loss measured like the val loss) and says which of five cases
the run is in, with the numbers that show it and the remedies that fit.

The parts (their public names are importable from `lmforge.diagnose` itself):

- `lmforge.diagnose.rules`: the five cases, their order (`RULES`), their thresholds and why,
  and the remedies (`diagnose_records`, `Diagnosis`);
- `lmforge.diagnose.facts`: a run's curves reduced to the numbers the rules read (`Facts`,
  `measure`) and the thresholds (`Thresholds`);
- `lmforge.diagnose.curves`: the curve statistics the rules read (trailing median, spikes, the
  recent trend: `recent_improvement`);
- `lmforge.diagnose.run`: reading a run dir (metrics.jsonl, config.yaml, summary.json, the
  bigram reference from its token dir: `diagnose_run`) and the live check at evals
  (`live_warning`, reading metrics.jsonl incrementally with `MetricsTail`);
- `lmforge.diagnose.report`: the text report (`format_diagnosis`).
"""

from lmforge.diagnose.curves import recent_improvement, trailing_median
from lmforge.diagnose.report import format_diagnosis
from lmforge.diagnose.rules import THRESHOLDS, VERDICTS, Diagnosis, Thresholds, diagnose_records
from lmforge.diagnose.run import (
    MetricsTail,
    bigram_reference,
    diagnose_run,
    live_warning,
    read_records,
)

__all__ = ["THRESHOLDS", "VERDICTS", "Diagnosis", "MetricsTail", "Thresholds", "bigram_reference",
           "diagnose_records", "diagnose_run", "format_diagnosis", "live_warning", "read_records",
           "recent_improvement", "trailing_median"]
