-- One Postgres (with pgvector) for the three databases of a single-host deployment:
-- Dagster's run/event/schedule storage, MLflow's backend store, and the media catalog.
CREATE DATABASE dagster;
CREATE DATABASE mlflow;
CREATE DATABASE catalog;
\connect catalog
-- the catalog's migrations also create it; doing it here keeps a non-superuser app role possible
CREATE EXTENSION IF NOT EXISTS vector;
