"""Shared pytest fixtures."""

from tests.s3_server import s3_server, s3_url  # noqa: F401 - fixtures: a SeaweedFS S3 server on loopback
