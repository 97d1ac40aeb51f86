"""Evaluation: task accuracy, reports and plots."""
