"""Data: built-in long-context tasks and Grain pipelines that batch them."""
