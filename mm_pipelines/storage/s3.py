"""One way to make an S3 client outside Dagster (the `mm` command, serving), configured by
the same settings as the S3 resource in defs/resources.py: short connect/read timeouts and few
attempts, so an unreachable endpoint fails a step within seconds, not after minutes of
hidden retries."""

from __future__ import annotations

from typing import Any

from mm_pipelines import settings


def client_config(max_attempts: int | None = None) -> Any:
    """botocore Config with our timeouts and retries (attempts include the first one)."""
    from botocore.config import Config

    return Config(
        connect_timeout=settings.s3_connect_timeout(),
        read_timeout=settings.s3_read_timeout(),
        retries={
            "total_max_attempts": max_attempts or settings.s3_max_attempts(),
            "mode": "standard",
        },
    )


def client() -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url(),
        region_name=settings.aws_region(),
        config=client_config(),
    )
