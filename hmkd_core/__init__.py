"""HMKD: knowledge distillation of small-object detectors by hierarchical matching.

The library knows nothing of HTTP, SQL or Celery: it takes a `TrainSpec` and a `Reporter`
and runs, so the service and the `hmkd train` command share one code path.
"""

__version__ = "0.1.0"
