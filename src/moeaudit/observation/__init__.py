"""Observational criteria: the metric registry, published criteria, weight-only criteria, per-document
statistics, and :func:`moeaudit.observe` which computes them per layer and expert."""
