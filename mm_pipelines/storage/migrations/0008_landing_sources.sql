-- Batches ingested from somewhere other than `<landing>/<batch>` (`mm ingest PATH`), and
-- the tenant a batch was ingested for: a re-materialization from the UI or a sensor finds
-- the same files and tenant again.

CREATE TABLE landing_sources (
    batch         text PRIMARY KEY,
    source_uri    text,                     -- NULL: the batch lives in the landing area
    tenant        text,                     -- NULL: the manifest's, else 'default'
    registered_at timestamptz NOT NULL DEFAULT now()
);
