"""Diagnose a training run from its curves: `lmforge diagnose RUN_DIR`, and a live warning at evals.

Reads `metrics.jsonl` (one record per step: `loss`, `grad_norm`, ...; eval steps add `val_loss`
and `train_eval_loss`, the train loss measured like the val loss) and says which of five cases
the run is in, with the numbers that show it and the remedies that fit.

The parts (their public names are importable from `lmforge.diagnose` itself):

- `lmforge.diagnose.rules`: the five cases, their order, their thresholds and why, and the
  remedies (`diagnose_records`, `Thresholds`, `Diagnosis`);
- `lmforge.diagnose.curves`: the curve statistics the rules read (trailing median, spikes, the
  recent trend);
- `lmforge.diagnose.run`: reading a run dir (metrics.jsonl, config.yaml, summary.json, the
  bigram reference from its token dir: `diagnose_run`) and the live check at evals
  (`live_warning`);
- `lmforge.diagnose.report`: the text report (`format_diagnosis`).
"""

from lmforge.diagnose.curves import _recent_improvement as _recent_improvement  # (tests use it)
from lmforge.diagnose.curves import trailing_median
from lmforge.diagnose.report import format_diagnosis
from lmforge.diagnose.rules import THRESHOLDS, VERDICTS, Diagnosis, Thresholds, diagnose_records
from lmforge.diagnose.run import _MetricsTail as _MetricsTail  # (tests use it)
from lmforge.diagnose.run import bigram_reference, diagnose_run, live_warning, read_records

__all__ = ["THRESHOLDS", "VERDICTS", "Diagnosis", "Thresholds", "bigram_reference", "diagnose_records",
           "diagnose_run", "format_diagnosis", "live_warning", "read_records", "trailing_median"]
