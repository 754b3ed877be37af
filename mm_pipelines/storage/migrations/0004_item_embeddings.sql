-- Encoder-space vectors (CLIP, Whisper encoder) of every embeddable item, keyed by an item
-- key that names what was encoded and by the encoder version: a re-run skips items already
-- encoded by the same model, a new model version never overwrites an old one.

CREATE TABLE item_embeddings (
    item_key        text NOT NULL,      -- e.g. image:<hash>, frame:<video>:<index>, ...
    encoder_version text NOT NULL,
    item_kind       text NOT NULL,
    content_hash    text NOT NULL,      -- the encoded bytes, or the source of the text
    parent_hash     text,               -- the video of a frame, the audio of a segment
    start_s         double precision,
    end_s           double precision,
    part            integer,            -- chunk / segment / window number
    text            text,
    char_start      integer,
    char_end        integer,
    embedding       vector NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (item_key, encoder_version)
);
