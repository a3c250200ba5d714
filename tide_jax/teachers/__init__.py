"""Frozen teachers: registry, conversion, loading, and how each is fed (docs/teachers.md)."""

from tide_jax.teachers.registry import (
    ARCHITECTURES,
    TEACHERS,
    Architecture,
    TeacherFamily,
    abstract_teacher,
    architecture_for,
    convert_teacher,
    load_teacher,
)
from tide_jax.teachers.teacher import Teacher

__all__ = [
    "ARCHITECTURES",
    "TEACHERS",
    "Architecture",
    "Teacher",
    "TeacherFamily",
    "abstract_teacher",
    "architecture_for",
    "convert_teacher",
    "load_teacher",
]
