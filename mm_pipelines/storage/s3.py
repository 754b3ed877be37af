"""One way to make an S3 client outside Dagster (the `mm` command, serving), configured by
the same settings as dagster-aws's S3Resource in defs/resources.py."""

from __future__ import annotations

from typing import Any

from mm_pipelines import settings


def client() -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint_url(), region_name=settings.aws_region()
    )
