-- The media catalog: one row per stored content (media_objects) and one row per source
-- file of a batch (media_sources). Identical content from several sources is stored once.

CREATE TABLE media_objects (
    content_hash  text PRIMARY KEY,          -- sha256 hex of the bytes
    modality      text NOT NULL CHECK (modality IN ('image', 'video', 'audio', 'text')),
    mime          text NOT NULL,
    size_bytes    bigint NOT NULL,
    width         integer,
    height        integer,
    duration_s    double precision,
    fps           double precision,
    has_audio     boolean,
    text_encoding text,
    storage_uri   text NOT NULL,
    probe_version text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE media_sources (
    batch          text NOT NULL,
    source_uri     text NOT NULL,
    tenant         text NOT NULL,
    content_hash   text,                     -- NULL when the file could not be read at all
    status         text NOT NULL CHECK (status IN ('ok', 'quarantined')),
    error_category text,
    error_message  text,
    note           text,                     -- non-fatal findings, e.g. a lying extension
    modality       text,
    mime           text,
    size_bytes     bigint,
    caption        text,
    fingerprint    text,                     -- size + mtime (or ETag): skip unchanged files
    probe_version  text NOT NULL,
    ingested_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch, source_uri),
    CHECK ((status = 'ok') = (error_category IS NULL))
);

CREATE INDEX media_sources_hash ON media_sources (content_hash);
CREATE INDEX media_sources_tenant ON media_sources (tenant, batch);

CREATE VIEW media_catalog AS
SELECT s.batch, s.source_uri, s.tenant, s.content_hash, s.status, s.error_category,
       s.error_message, s.note, s.modality, s.mime, s.size_bytes, s.caption,
       o.width, o.height, o.duration_s, o.fps, o.has_audio, o.text_encoding,
       o.storage_uri, s.probe_version, s.ingested_at
FROM media_sources s
LEFT JOIN media_objects o ON o.content_hash = s.content_hash AND s.status = 'ok';
