import dagster as dg

from mm_pipelines.storage.landing import BATCH_NAME

# one landing drop of files = one batch
batch_partitions = dg.DynamicPartitionsDefinition(name="batch")

# one declared LoRA subject (subjects.yaml) = one subject
subject_partitions = dg.DynamicPartitionsDefinition(name="subject")


def check_partition_key(partitions: str, key: str) -> None:
    """Refuse a batch name the landing area would refuse, before it becomes a partition
    (a partition stays in the UI for good)."""
    if partitions == batch_partitions.name and not BATCH_NAME.match(key):
        raise ValueError(
            f"invalid batch name {key!r}: letters, digits, '.', '_' and '-', starting with a "
            "letter or digit, at most 128 characters"
        )
