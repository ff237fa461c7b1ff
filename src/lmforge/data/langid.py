"""Language identification with py3langid, whose model ships inside the package (no download).

The identifier is loaded once per process (about 0.3 s) and classifies a prefix of each
document: documents are one language, and the prefix bounds the cost of long ones.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # the model ships in the package

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str, sample_chars: int = 4000) -> tuple[str, float]:
    """(ISO 639-1 code, confidence in [0, 1]) of `text`'s first `sample_chars` characters."""
    sample = text[:sample_chars]
    if not sample.strip():
        return "", 0.0
    lang, score = _identifier().classify(sample)
    return str(lang), round(float(score), 4)
