"""Celery workers: the app (`worker.celery_app`), the job task, the database reporter.

Importing this package imports nothing heavy: the training process (`worker.child`) is spawned
from it and must not pay for, or be affected by, the Celery app.
"""
