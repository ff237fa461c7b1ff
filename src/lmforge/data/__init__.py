"""Raw data: read corpora (`readers`), fetch real text without a hub (`fetch`), and turn raw
corpora into clean, deduplicated train/val/test parquet shards (`prepare.prepare_data`, the
`lmforge data prepare` command: sources -> normalize -> filters -> safety -> dedup -> split)."""

from lmforge.data.fetch import fetch_shakespeare
from lmforge.data.readers import Document, iter_documents, list_splits

__all__ = ["Document", "fetch_shakespeare", "iter_documents", "list_splits"]
