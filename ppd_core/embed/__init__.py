"""User preference embeddings: the embedder interface, the VLM and CLIP embedders, the tiny offline
default models, the synthetic world's reference embedders, extraction and the user probe."""
