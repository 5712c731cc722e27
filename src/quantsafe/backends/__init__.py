"""Model backends (transformers now; vLLM and HTTP later) behind one small contract."""

from quantsafe.backends.base import Backend, DecodingConfig, Generation, Message

__all__ = ["Backend", "DecodingConfig", "Generation", "Message"]
