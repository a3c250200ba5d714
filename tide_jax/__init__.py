"""tide_jax package."""
