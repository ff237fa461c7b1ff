"""`python -m lmforge ...` (used by torchrun: `torchrun --nproc_per_node 2 -m lmforge pretrain ...`)."""

from lmforge.cli import entry

raise SystemExit(entry())
