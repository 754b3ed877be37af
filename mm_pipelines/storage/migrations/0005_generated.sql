-- Generated media: every image made by a subject's adapter, with the lineage needed to
-- regenerate it (adapter, base model, prompt, seed, sampler settings). The bytes live in
-- the media store like any other object (a media_objects row, probe_version 'generated').

CREATE TABLE generated_media (
    subject          text NOT NULL,
    adapter_version  text NOT NULL,         -- content-derived version of the LoRA weights
    content_hash     text NOT NULL REFERENCES media_objects (content_hash),
    base_model       text NOT NULL,         -- version of the base diffusion pipeline
    registered_model text,                  -- MLflow registered model name:version
    prompt           text NOT NULL,
    seed             bigint NOT NULL,
    params           jsonb NOT NULL,        -- sampler, steps, guidance, size, negative prompt
    dagster_run_id   text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, adapter_version, prompt, seed)
);

CREATE INDEX generated_media_hash ON generated_media (content_hash);
