"""Hashed n-gram features of texts, computed by the C++ featurizer (``text_features.hpp``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

#: The featurizer parameters of a new router, as stored in ``router.json``.
DEFAULT_FEATURIZER: dict[str, int] = {
    "hash_bits": 18,
    "word_ngrams": 2,
    "char_ngram_min": 3,
    "char_ngram_max": 5,
    "max_input_bytes": 16384,
}


def featurize(text: str | bytes, featurizer: Mapping[str, int] = DEFAULT_FEATURIZER) -> tuple[np.ndarray, np.ndarray]:
    """Return the sparse features of one text.

    Parameters
    ----------
    text
        Any string or bytes; invalid UTF-8 and lone surrogates are replaced, never refused.
    featurizer
        Featurizer parameters (see :data:`DEFAULT_FEATURIZER`).

    Returns
    -------
    tuple of numpy.ndarray
        Sorted unique bucket ids (``uint32``) and their L2-normalised values (``float32``).
    """
    from meswitch import _core

    return _core.router_featurize(text, **dict(featurizer))


def feature_matrix(texts: Iterable[str | bytes], featurizer: Mapping[str, int] = DEFAULT_FEATURIZER) -> Any:
    """Return the features of many texts as a ``scipy.sparse.csr_matrix`` of shape ``(texts, 2**hash_bits)``."""
    import scipy.sparse

    from meswitch import _core

    indptr, indices, values = _core.router_featurize_batch(list(texts), **dict(featurizer))
    return scipy.sparse.csr_matrix((values, indices, indptr), shape=(len(indptr) - 1, 1 << featurizer["hash_bits"]))


__all__ = ["DEFAULT_FEATURIZER", "feature_matrix", "featurize"]
