-- The unified embedding space: every item (image, video frame, caption, text chunk,
-- transcript segment, audio window) as one vector, with its lineage.
-- The column is dimension-free so models of different sizes can live side by side; each
-- dimension gets its own partial HNSW expression index (created on first load, see
-- storage/vectors.py), and queries use the same expression so the planner picks it.

CREATE TABLE unified_vectors (
    id                bigserial PRIMARY KEY,
    batch             text NOT NULL,
    tenant            text NOT NULL,
    item_kind         text NOT NULL,   -- image | video_frame | caption | text_chunk |
                                       -- transcript_segment | audio | audio_window
    modality          text NOT NULL,   -- image | video | audio | text (of the source)
    content_hash      text NOT NULL,   -- what was encoded: the image, frame, or source text
    parent_hash       text,            -- the video of a frame, the audio/video of a segment
    source_uri        text,
    start_s           double precision,
    end_s             double precision,
    chunk_index       integer,
    text              text,
    encoder_version   text NOT NULL,
    projector_version text NOT NULL,
    embedding         vector NOT NULL
);

CREATE INDEX unified_vectors_batch ON unified_vectors (batch);
CREATE INDEX unified_vectors_tenant ON unified_vectors (tenant, projector_version);
