import dagster as dg

# one landing drop of files = one batch
batch_partitions = dg.DynamicPartitionsDefinition(name="batch")
