-- Derived rows of the `understand` group. Keyed by the source's content hash and the
-- version of what derived them, never by batch: the same video in two batches is sampled
-- once, and a new strategy or model version never mixes with an old one.

CREATE TABLE frame_samplings (              -- one row per (video, strategy version) done
    video_hash       text NOT NULL,
    strategy_version text NOT NULL,          -- e.g. frames_v1:uniform:n=16
    status           text NOT NULL CHECK (status IN ('ok', 'quarantined')),
    error_category   text,
    error_message    text,
    frame_count      integer NOT NULL DEFAULT 0,
    decoder          text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (video_hash, strategy_version)
);

CREATE TABLE video_frames (
    video_hash       text NOT NULL,
    strategy_version text NOT NULL,
    strategy         text NOT NULL,
    frame_index      integer NOT NULL,
    timestamp_s      double precision NOT NULL,
    frame_hash       text NOT NULL,          -- the stored image's own content hash
    storage_uri      text NOT NULL,
    width            integer NOT NULL,
    height           integer NOT NULL,
    PRIMARY KEY (video_hash, strategy_version, frame_index),
    FOREIGN KEY (video_hash, strategy_version)
        REFERENCES frame_samplings (video_hash, strategy_version) ON DELETE CASCADE
);

CREATE TABLE transcriptions (                -- one row per (audio content, model version)
    content_hash         text NOT NULL,
    model_version        text NOT NULL,
    status               text NOT NULL CHECK (status IN ('ok', 'quarantined')),
    error_category       text,
    error_message        text,
    language             text,
    language_probability real,
    audio_duration_s     double precision,
    created_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (content_hash, model_version)
);

CREATE TABLE transcript_segments (
    content_hash  text NOT NULL,
    model_version text NOT NULL,
    segment_index integer NOT NULL,
    start_s       double precision NOT NULL,
    end_s         double precision NOT NULL,
    text          text NOT NULL,
    avg_logprob   real,
    words         jsonb NOT NULL DEFAULT '[]',   -- [{word, start, end, probability}]
    PRIMARY KEY (content_hash, model_version, segment_index),
    FOREIGN KEY (content_hash, model_version)
        REFERENCES transcriptions (content_hash, model_version) ON DELETE CASCADE
);
