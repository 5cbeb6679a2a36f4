"""Checkpoint files: resolution (local or hub), the native format, and naver's COCOM format.

Native (what pisco-rag saves): ``config.json`` plus ``adapters.safetensors`` (the reader's LoRA
adapters, keys prefixed by adapter name), ``retriever.safetensors`` when the model has a
retriever adapter (its own file, so that retraining the retriever leaves the reader's files
byte for byte; older checkpoints kept it in ``adapters.safetensors`` and still load) and
``embeddings.safetensors`` (the embedding / output rows that differ from the backbone: the added
tokens, and any others a checkpoint changed). Base weights are referenced by
``config.backbone``, never copied. No pickle.

Naver COCOM (``naver/pisco-*``): ``config.json`` with ``model_type: "COCOM"``,
``decoder_first_last_layers.pth`` (full ``embed_tokens``/``lm_head``) and ``adapters.pth``
(``{adapter_name: state_dict}``), read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file, save_file

from .adapters import RETRIEVER
from .defaults import embedded_backbone_dir
from .errors import CheckpointError
from .verbosity import quiet_loading

logger = logging.getLogger(__name__)

NATIVE_FILES = ("config.json", "adapters.safetensors", "embeddings.safetensors")
RETRIEVER_FILE = "retriever.safetensors"
NAVER_FILES = ("config.json", "adapters.pth", "decoder_first_last_layers.pth")


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (asked once per process).
    ``HF_HUB_OFFLINE=1`` says no without asking. Offline, hub ids resolve from the local cache
    only, so a missing model fails at once instead of after a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        logger.info("the hub (%s) is not reachable: using the local cache only", host)
        return False
    return True


def resolve_checkpoint(name_or_path: str | os.PathLike[str], *, local_files_only: bool) -> Path:
    """A local directory as is, else a hub snapshot (only the files the loaders read)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{str(path)!r} is a file; give the checkpoint's directory")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(
            f"checkpoint directory {name!r} does not exist (and it is not a hub id 'owner/name')"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                name,
                allow_patterns=["*.json", "*.pth", "*.safetensors", "compressor/*"],
                local_files_only=local_files_only or not hub_reachable(),
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {name!r} is not in the local Hugging Face cache and could not be "
            f"downloaded ({type(e).__name__}). On a machine with network access run "
            f"`hf download {name} --local-dir DIR`, copy DIR here and pass its path instead."
        ) from None


def checkpoint_kind(directory: Path) -> str:
    """``"native"`` or ``"naver"``, from ``config.json``."""
    cfg = read_json(directory / "config.json", what="checkpoint config")
    if cfg.get("model_type") == "COCOM":
        return "naver"
    if "pisco_rag_format" in cfg:
        return "native"
    raise CheckpointError(
        f"{directory}/config.json is neither a pisco-rag checkpoint (no 'pisco_rag_format') nor "
        f"a naver COCOM checkpoint (model_type={cfg.get('model_type')!r})"
    )


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    require_files(path.parent, [path.name], what=what)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} must hold a JSON object (the {what}'s settings), got {type(data).__name__}"
        )
    return data


def require_files(directory: Path, names: list[str] | tuple[str, ...], *, what: str) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{what} in {directory} is missing {', '.join(missing)}; copy the complete "
            "checkpoint directory"
        )


def read_naver(directory: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, dict]]:
    """(config, first/last layer tensors, {adapter_name: state_dict}) of a naver checkpoint."""
    require_files(directory, NAVER_FILES, what="naver COCOM checkpoint")
    cfg = read_json(directory / "config.json", what="naver COCOM checkpoint")
    first_last = _torch_load(directory / "decoder_first_last_layers.pth")
    adapters = _torch_load(directory / "adapters.pth")
    if not isinstance(adapters, dict) or "decoder_adapter" not in adapters:
        raise CheckpointError(
            f"{directory}/adapters.pth has no 'decoder_adapter' (keys: {list(adapters)[:5]})"
        )
    return cfg, first_last, adapters


def read_naver_compressor(directory: Path, *, lora: bool, mlp: bool) -> tuple[Any, Any, Any, Any]:
    """(full state dict, connector MLP, first layer, LoRA adapter) of naver's ``compressor/``;
    the ones the configuration does not use are None."""
    sub = directory / "compressor"
    names = ["mlp.pth"] if mlp else []
    names += ["first_layer.pth", "compressor_adapters.pth"] if lora else ["compressor.pth"]
    require_files(sub, names, what="naver OSCAR compressor")
    full = None if lora else _torch_load(sub / "compressor.pth")
    first = _torch_load(sub / "first_layer.pth") if lora else None
    adapter = _torch_load(sub / "compressor_adapters.pth") if lora else None
    return full, _torch_load(sub / "mlp.pth") if mlp else None, first, adapter


def read_native_compressor(directory: Path, is_oscar: bool) -> dict[str, torch.Tensor] | None:
    if not is_oscar:
        return None
    require_files(directory, ["compressor.safetensors"], what="pisco-rag OSCAR checkpoint")
    try:
        return load_file(directory / "compressor.safetensors")
    except Exception as e:
        raise CheckpointError(f"cannot read {directory}/compressor.safetensors: {e}") from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} with torch.load(weights_only=True): {e}"
        ) from None


def save_native(
    directory: Path,
    config: dict[str, Any],
    adapters: dict[str, dict[str, torch.Tensor]],
    embeddings: dict[str, torch.Tensor],
    compressor: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    def plain(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().contiguous().cpu()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    directory.mkdir(parents=True, exist_ok=True)
    if compressor is not None:
        save_file(
            {k: plain(v) for k, v in compressor.items()},
            directory / "compressor.safetensors",
            metadata={"format": "pt"},
        )

    def flat(names: list[str]) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": plain(t) for name in names for key, t in adapters[name].items()}

    reader = [name for name in adapters if name != RETRIEVER]
    save_file(flat(reader), directory / "adapters.safetensors", metadata={"format": "pt"})
    retriever = directory / RETRIEVER_FILE
    if RETRIEVER in adapters:
        save_file(flat([RETRIEVER]), retriever, metadata={"format": "pt"})
    elif retriever.exists():  # saved over a checkpoint that had one
        retriever.unlink()
    save_file(
        {k: plain(v) for k, v in embeddings.items()},
        directory / "embeddings.safetensors",
        metadata={"format": "pt"},
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_native(directory: Path) -> tuple[dict, dict[str, dict], dict[str, torch.Tensor]]:
    require_files(directory, NATIVE_FILES, what="pisco-rag checkpoint")
    cfg = read_json(directory / "config.json", what="pisco-rag checkpoint")
    try:
        flat = load_file(directory / "adapters.safetensors")
        if (directory / RETRIEVER_FILE).is_file():
            flat.update(load_file(directory / RETRIEVER_FILE))
        embeddings = load_file(directory / "embeddings.safetensors")
    except Exception as e:
        raise CheckpointError(f"cannot read the safetensors files in {directory}: {e}") from None
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        name, _, param = key.partition(".")
        adapters.setdefault(name, {})[param] = t
    return cfg, adapters, embeddings


def load_backbone(
    name: str, *, dtype: torch.dtype | None, local_files_only: bool
) -> tuple[Any, Any]:
    """(causal LM, tokenizer) for a backbone name: ``embedded:<name>``, a local dir, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = backbone_source(name)
    if isinstance(source, str):  # a hub id
        local_files_only = local_files_only or not hub_reachable()
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype or torch.float32, local_files_only=local_files_only
            )
    except OSError as e:
        raise CheckpointError(
            f"backbone {name!r} could not be loaded ({str(e).splitlines()[0]}). Without network "
            "access, download it elsewhere (`hf download NAME --local-dir DIR`) and pass "
            "backbone=DIR, or use the embedded default (PiscoModel.from_pretrained('embedded'))."
        ) from None
    return model, tokenizer


def load_tokenizer(name: str, *, local_files_only: bool = False) -> Any:
    """The tokenizer of a backbone name (as :func:`load_backbone` resolves it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(backbone_source(name), local_files_only=local_files_only)


def backbone_source(name: str) -> str | Path:
    """Where a backbone name loads from: the embedded cache dir, a local dir, or a hub id."""
    if name.startswith("embedded:"):
        return embedded_backbone_dir(name.removeprefix("embedded:"))
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # a hub id
    raise CheckpointError(
        f"backbone {name!r} is neither a local directory nor a hub id 'owner/name'. A model "
        "built from a model instance names no loadable backbone: save the backbone "
        "(save_pretrained) and pass backbone=DIR."
    )
