"""Raw data: read corpora (`readers`, the one reader stack every stage uses), fetch real text
without a hub (`fetch`), and turn raw corpora into clean, deduplicated train/val/test parquet
shards (`prepare.prepare_data`, the `lmforge data prepare` command: sources -> normalize ->
the filter chain (`chain`: langid, quality, repetition, safety) -> dedup -> split, by the one
content-hash splitter in `split`)."""

from lmforge.data.fetch import fetch_shakespeare
from lmforge.data.readers import Document, iter_documents, list_splits

__all__ = ["Document", "fetch_shakespeare", "iter_documents", "list_splits"]
