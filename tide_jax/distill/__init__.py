"""Distillation objectives: token terms, chunk terms, CompDemo, teacher inputs, recipes.

See docs/distill.md. The train step calls ``recipes.distillation_loss`` (or
``recipes.distillation_parts`` + ``recipes.finalize`` when it runs per shard).
"""
