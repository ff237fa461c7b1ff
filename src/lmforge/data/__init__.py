"""Raw data: read corpora as documents (`readers`) and fetch real text without a hub (`fetch`)."""

from lmforge.data.fetch import fetch_shakespeare
from lmforge.data.readers import Document, iter_documents, list_splits

__all__ = ["Document", "fetch_shakespeare", "iter_documents", "list_splits"]
