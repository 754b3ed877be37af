-- API keys of the serving API. A key is `mm_<key_id>_<secret>`; only the sha256 of the
-- secret is stored (the secret has 256 random bits, so a fast hash is enough: nothing to
-- brute-force). A key is bound to one tenant, or has the admin scope (tenant NULL).

CREATE TABLE api_keys (
    key_id          text PRIMARY KEY,            -- public: shown by `mm keys list`, in logs
    secret_sha256   text NOT NULL,
    tenant          text,                        -- NULL for the admin scope
    scope           text NOT NULL CHECK (scope IN ('tenant', 'admin')),
    name            text NOT NULL DEFAULT '',
    rate_per_minute integer NOT NULL CHECK (rate_per_minute > 0),
    burst           integer NOT NULL CHECK (burst > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    CHECK ((scope = 'admin') = (tenant IS NULL))
);

CREATE INDEX api_keys_tenant ON api_keys (tenant);
