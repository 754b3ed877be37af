-- Curation: manifest labels, near-duplicates with a keep-one policy, content scores with a
-- per-tenant flagging policy, and captions. Every derived row names the content hash and
-- the method/model version it came from, so a re-run skips work done and a new version
-- never mixes with an old one.

-- labels from the manifest (`"label": "unsafe"` or a list): examples the heads learn from
ALTER TABLE media_sources ADD COLUMN labels text[] NOT NULL DEFAULT '{}';

CREATE OR REPLACE VIEW media_catalog AS
SELECT s.batch, s.source_uri, s.tenant, s.content_hash, s.status, s.error_category,
       s.error_message, s.note, s.modality, s.mime, s.size_bytes, s.caption,
       o.width, o.height, o.duration_s, o.fps, o.has_audio, o.text_encoding,
       o.storage_uri, s.probe_version, s.ingested_at, s.labels
FROM media_sources s
LEFT JOIN media_objects o ON o.content_hash = s.content_hash AND s.status = 'ok';

-- Every picture of a tenant (images and sampled video frames) with what the keep-one
-- policy needs: its resolution and when the tenant first had it.
CREATE VIEW tenant_pictures AS
SELECT s.tenant, s.content_hash, 'image'::text AS item_kind, NULL::text AS parent_hash,
       o.width, o.height, min(s.ingested_at) AS first_seen
FROM media_sources s JOIN media_objects o USING (content_hash)
WHERE s.status = 'ok' AND o.modality = 'image' AND o.probe_version <> 'generated'
GROUP BY s.tenant, s.content_hash, o.width, o.height
UNION ALL
SELECT s.tenant, f.frame_hash, 'video_frame', f.video_hash, max(f.width), max(f.height),
       min(s.ingested_at)
FROM video_frames f JOIN media_sources s ON s.content_hash = f.video_hash AND s.status = 'ok'
GROUP BY s.tenant, f.frame_hash, f.video_hash;

-- perceptual signatures: a pure function of the content, shared by every tenant
CREATE TABLE perceptual_hashes (
    content_hash      text NOT NULL,
    signature_version text NOT NULL,         -- e.g. phash-v2:imagehash-4.3.2:8x8+rgb4x4
    hash              bit(64) NOT NULL,      -- pHash, compared with pgvector's Hamming <~>
    colour            vector(48) NOT NULL,   -- 4x4 RGB thumbnail / its mean, L1 <+>
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (content_hash, signature_version)
);

-- which pictures were already searched for duplicates, per tenant and method version
CREATE TABLE near_duplicate_checks (
    tenant         text NOT NULL,
    content_hash   text NOT NULL,
    method_version text NOT NULL,            -- phash-...:d<=N,c<=C or clip:<encoder>:cos>=T
    batch          text NOT NULL,            -- the batch whose run checked it
    checked_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, content_hash, method_version)
);

-- the relation: `item_hash` (found by a batch's run) is a near-duplicate of `duplicate_of`
-- (anything of the same tenant); one row per unordered pair and method version
CREATE TABLE near_duplicates (
    tenant         text NOT NULL,
    item_hash      text NOT NULL,
    duplicate_of   text NOT NULL,
    item_kind      text NOT NULL,            -- image | video_frame
    duplicate_kind text NOT NULL,
    similarity     real NOT NULL,            -- cosine (clip), 1 - hamming/64 (phash)
    method         text NOT NULL CHECK (method IN ('phash', 'clip')),
    method_version text NOT NULL,
    batch          text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (item_hash <> duplicate_of)
);
CREATE UNIQUE INDEX near_duplicates_pair ON near_duplicates
    (tenant, LEAST(item_hash, duplicate_of), GREATEST(item_hash, duplicate_of), method_version);
CREATE INDEX near_duplicates_item ON near_duplicates (tenant, item_hash);
CREATE INDEX near_duplicates_other ON near_duplicates (tenant, duplicate_of);

-- keep-one: one row per image in a duplicate group (keepers included, keeper_hash = self)
CREATE TABLE duplicate_groups (
    tenant         text NOT NULL,
    content_hash   text NOT NULL,
    keeper_hash    text NOT NULL,
    group_size     integer NOT NULL,
    policy_version text NOT NULL,
    PRIMARY KEY (tenant, content_hash)
);

-- scores of heads on encoder vectors, per scored part (image, frame, caption, chunk, segment)
CREATE TABLE content_scores (
    item_key        text NOT NULL,           -- the item_embeddings key that was scored
    score_name      text NOT NULL,           -- aesthetic | unsafe | text_unsafe
    head_version    text NOT NULL,
    encoder_version text NOT NULL,
    item_kind       text NOT NULL,
    content_hash    text NOT NULL,           -- what was encoded
    source_hash     text NOT NULL,           -- the catalog item it belongs to
    score           real NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (item_key, score_name, head_version)
);
CREATE INDEX content_scores_source ON content_scores (source_hash, score_name);

-- items a tenant's policy flags: they stay in the catalog with the reason, and leave
-- search results and training sets
CREATE TABLE content_flags (
    tenant       text NOT NULL,
    content_hash text NOT NULL,              -- the catalog item (image, video, audio, text)
    score_name   text NOT NULL,
    score        real NOT NULL,
    threshold    real NOT NULL,
    reason       text NOT NULL,
    head_version text NOT NULL,
    policy       jsonb NOT NULL,
    batch        text NOT NULL,
    flagged_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, content_hash, score_name)
);

-- what search and training-set selection leave out, and why
CREATE VIEW curation_hidden AS
SELECT tenant, content_hash, 'flagged'::text AS cause, reason FROM content_flags
UNION ALL
SELECT tenant, content_hash, 'near_duplicate', 'near-duplicate of ' || keeper_hash
FROM duplicate_groups WHERE content_hash <> keeper_hash;

-- captions of images and frames: from the manifest or a model
CREATE TABLE captions (
    content_hash text NOT NULL,
    source       text NOT NULL,              -- manifest | model:<version>
    caption      text NOT NULL,
    confidence   real,
    item_kind    text NOT NULL,              -- image | video_frame
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (content_hash, source)
);

-- the caption an item is trained with: the manifest's always wins, else the latest model's
CREATE VIEW effective_captions AS
SELECT DISTINCT ON (content_hash) content_hash, caption, source, confidence
FROM captions
ORDER BY content_hash, (source = 'manifest') DESC, created_at DESC, source;
