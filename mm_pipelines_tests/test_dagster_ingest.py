"""raw_media as Dagster runs it: materialize(), checks, the landing sensor, S3 via
dagster-aws against a real S3-protocol server, and the Definitions load."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import dagster as dg
import psycopg
from dagster_aws.s3 import S3Resource

from mm_pipelines.defs import defs
from mm_pipelines.defs.ingest.assets import raw_media
from mm_pipelines.defs.ingest.checks import objects_intact, quarantine_rate
from mm_pipelines.defs.ingest.sensors import landing_sensor
from mm_pipelines.defs.partitions import batch_partitions
from mm_pipelines.defs.resources import (
    CatalogResource,
    ComputeResource,
    LandingResource,
    MediaStoreResource,
)
from mm_pipelines_tests import bad_media

REPO = Path(__file__).resolve().parents[1]


def resources(dsn: str, landing: str, media: str, s3: dg.ConfigurableResource, bucket=None):
    s3 = s3 or S3Resource()
    return {
        "catalog_db": CatalogResource(dsn=dsn),
        "landing": LandingResource(uri=landing, s3=s3),
        "media_store": MediaStoreResource(local_dir=media, s3_bucket=bucket, s3=s3),
        "compute": ComputeResource(io_workers=2),
    }


def write_local_batch(landing: Path, name: str, ready: bool = True) -> None:
    root = landing / name
    root.mkdir(parents=True)
    (root / "a.png").write_bytes(bad_media.png_bytes())
    (root / "b.jpg").write_bytes(bad_media.jpeg_bytes())
    (root / "empty.txt").write_bytes(b"")
    if ready:
        (root / "_READY").touch()


def materialize_batch(
    batch: str, res: dict, instance: dg.DagsterInstance
) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions(batch_partitions.name, [batch])
    return dg.materialize(
        [raw_media, quarantine_rate, objects_intact],
        partition_key=batch,
        instance=instance,
        resources=res,
        raise_on_error=False,
    )


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_materialize_raw_media_reports_counts_and_passes_checks(tmp_path, pg_dsn):
    write_local_batch(tmp_path / "landing", "b1")
    res = resources(pg_dsn, str(tmp_path / "landing"), str(tmp_path / "media"), None)
    with dg.instance_for_test() as instance:
        result = materialize_batch("b1", res, instance)
        assert result.success
        meta = result.asset_materializations_for_node("raw_media")[0].metadata
        assert (meta["files_seen"].value, meta["ok"].value, meta["quarantined"].value) == (3, 2, 1)
        assert "empty_file" in meta["quarantined_files"].value
        assert "data:image/png;base64," in meta["thumbnails"].value
        assert check_results(result) == {"quarantine_rate": False, "objects_intact": True}


def test_objects_intact_fails_when_a_stored_object_is_corrupted(tmp_path, pg_dsn):
    write_local_batch(tmp_path / "landing", "b1")
    res = resources(pg_dsn, str(tmp_path / "landing"), str(tmp_path / "media"), None)
    with dg.instance_for_test() as instance:
        assert materialize_batch("b1", res, instance).success
        victim = next(
            p for p in (tmp_path / "media").rglob("*") if p.is_file() and ".incoming" not in p.parts
        )
        victim.write_bytes(b"bit rot")
        # an unchanged landing file is not copied again, so the damage stays visible
        result = dg.materialize(
            [raw_media, quarantine_rate, objects_intact],
            partition_key="b1",
            instance=instance,
            resources=res,
            raise_on_error=False,
        )
    assert check_results(result)["objects_intact"] is False


def test_landing_sensor_requests_each_complete_batch_once(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    res = {"landing": LandingResource(uri=str(landing), s3=S3Resource())}
    with dg.instance_for_test() as instance:

        def tick(cursor):
            with dg.build_sensor_context(instance=instance, cursor=cursor, resources=res) as ctx:
                return landing_sensor(ctx)

        assert isinstance(tick(None), dg.SkipReason)

        write_local_batch(landing, "b1", ready=False)  # still being written
        assert isinstance(tick(None), dg.SkipReason)

        (landing / "b1" / "_READY").touch()
        result = tick(None)
        assert [r.partition_key for r in result.run_requests] == ["b1"]
        assert result.dynamic_partitions_requests[0].partition_keys == ["b1"]
        cursor = result.cursor
        instance.add_dynamic_partitions("batch", ["b1"])

        assert isinstance(tick(cursor), dg.SkipReason)

        write_local_batch(landing, "b2")
        result = tick(cursor)
        assert [r.partition_key for r in result.run_requests] == ["b2"]
        assert set(json.loads(result.cursor)) == {"b1", "b2"}  # batch -> digest requested


def test_s3_landing_and_store_through_dagster_aws(tmp_path, pg_dsn, s3_env):
    bucket = f"mm-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    odd_key = "landing/s3b/odd name +%#?&=ünï 日本.png"
    client.put_object(Bucket=bucket, Key=odd_key, Body=bad_media.png_bytes())
    client.put_object(Bucket=bucket, Key="landing/s3b/photo.jpg", Body=bad_media.jpeg_bytes())
    client.put_object(Bucket=bucket, Key="landing/s3b/zero.jpg", Body=b"")
    client.put_object(Bucket=bucket, Key="landing/s3b/_READY", Body=b"")
    s3 = S3Resource(endpoint_url=s3_env, region_name="us-east-1")
    res = resources(pg_dsn, f"s3://{bucket}/landing", str(tmp_path / "unused"), s3, bucket=bucket)

    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(
            instance=instance, resources={"landing": res["landing"]}
        ) as ctx:
            assert [r.partition_key for r in landing_sensor(ctx).run_requests] == ["s3b"]
        result = materialize_batch("s3b", res, instance)
    assert result.success and check_results(result)["objects_intact"]
    with psycopg.connect(pg_dsn) as conn:
        rows = dict(
            conn.execute("SELECT source_uri, coalesce(error_category, status) FROM media_sources")
        )
    assert rows[f"s3://{bucket}/{odd_key}"] == "ok"
    assert rows[f"s3://{bucket}/landing/s3b/zero.jpg"] == "empty_file"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="media/")["Contents"]]
    assert len(keys) == 2 and not (tmp_path / "unused").exists()


def test_definitions_load_and_validate():
    assert defs.resolve_job_def("batch_pipeline") is not None
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
