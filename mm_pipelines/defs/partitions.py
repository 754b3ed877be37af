import dagster as dg

# one landing drop of files = one batch
batch_partitions = dg.DynamicPartitionsDefinition(name="batch")

# one declared LoRA subject (subjects.yaml) = one subject
subject_partitions = dg.DynamicPartitionsDefinition(name="subject")
