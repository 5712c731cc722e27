"""The decoding settings that key cached generations."""

import pytest

from quantsafe.backends import DecodingConfig


@pytest.mark.parametrize("update", [{"batch_size": 1}, {"max_batch_tokens": 512}, {"max_prompt_tokens": 64}])
def test_batching_settings_change_the_key(update: dict[str, int]) -> None:
    """Batch composition changes outputs (per-batch seed, bf16 padding), so it must change the cache key."""
    base = DecodingConfig()
    assert base.model_copy(update=update).key_fields() != base.key_fields()
