"""Model management, above the engine runtime: the catalog, the local registry (models.json),
pulls (download, then quantize), the Hugging Face cache and removal. Nothing heavy at import:
`resolve.resolve_model` runs at CLI start-up; huggingface_hub and torch load inside the functions
that need them."""
