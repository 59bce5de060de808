"""Bundled lm-eval task definitions (YAML + loaders)."""
