"""``s3://`` locations (and S3-compatible endpoints): our own atomic multipart upload, ranged GETs, a lease."""

from ml_playground.checkpoint.stores.s3._store import S3Store

__all__ = ["S3Store"]
