"""Continual evaluation: metrics, accuracy matrix, thresholds, figures and reports.

Modules: ``metrics`` (per-product AUROC/AP/F1-max/AUPRO/routing), ``aupro`` (exact AUPRO),
``ranking`` (shared tie-aware ranking), ``continual`` (``AccuracyMatrix``, FM, BWT, metrics.json
schema), ``evaluate`` (``evaluate_tasks``), ``thresholds`` (from held-out training normals),
``figures`` + ``report`` (``write_report``, ``report_command``).
"""
