"""Fast-weight (test-time-training) MLPs for Hugging Face decoders. See DESIGN.md."""

from trainer.ttt.config import TTTConfig
from trainer.ttt.patch import patch_model

__all__ = ["TTTConfig", "patch_model"]
