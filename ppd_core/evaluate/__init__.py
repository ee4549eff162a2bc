"""Evaluation: personalized generation, reward models, judges, win rates, interpolation and the report."""
