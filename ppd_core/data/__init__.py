"""Data: Pick-a-Pic v2 reading, the synthetic world, ingestion, few-shot sampling, image shards."""
