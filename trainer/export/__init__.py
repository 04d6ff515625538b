"""Exported Hugging Face folders that load without this package: the TTT config fields (`fields`), the mixin the
folder's modeling code builds on (`causal_lm`) and the sources shipped with it (`remote_code`)."""
