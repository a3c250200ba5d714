"""Data: tokenizers, chat templates, alignments, the TFDS dataset and the batch iterator.

Entry points: `tokenizers.get_tokenizer`, `tokenizers.token_bytes`, `pipeline.make_iterator`,
and `python -m tide_jax.data.prepare --config=...` (see docs/data.md).
"""
