"""The bundled run configs (tiny, small, 350m ... 7b), found by name: `--config small`.

This directory is the package `edit_jax.configs` once installed (pyproject.toml's package-dir),
so the YAML files ship inside the wheel; edit_jax/config.py finds them.
"""
