"""Context budgets: every LLM pass's longest prompt and its answer budget against the model's context.

In: a ``JobSpec`` and the longest requests of each pass a run makes (the tree levels, generation,
the pair prior, the llm judge: ``Stage.longest_requests``), built from the spec alone. Out:
nothing, or a ``ConfigError`` naming the field that made a prompt too long for
``model.max_model_len`` and the fix, before any engine starts (``anyclf-ray plan`` and every
command run it).

Prompts are counted with the model's own tokenizer and chat template when the model is on this
machine (a ``builtin:`` model, a local folder, a hub id in the local cache), else estimated at
``config.chars_per_token`` characters a token. Tree items, unknown before the LLM writes them,
are taken ``sampling.max_item_chars`` long, and a judged text ``max_text_chars`` long. A prompt
that still overflows at run time (a longer tokenisation than counted) fails as one request
(``engine.PROMPT_TOO_LONG``), counted, never as a crash of the run.
"""

from __future__ import annotations

import functools
import logging
import math

import pyarrow as pa

from anyclf_ray.core import models
from anyclf_ray.core.config import JobSpec
from anyclf_ray.core.loading import ConfigError
from anyclf_ray.core.tokens import chars_per_token
from anyclf_ray.llm import engine

log = logging.getLogger(__name__)


@functools.cache
def tokenizer(reference: str):
    """The model's Hugging Face tokenizer when it is on this machine, else None."""
    local = reference.startswith(models.BUILTIN_PREFIX) or models.is_local_path(reference)
    if not local and not models.HUB_ID.match(reference):
        return None  # a name only an endpoint knows (engine.kind openai), such as qwen2.5:7b
    if not local:
        import huggingface_hub

        if not isinstance(huggingface_hub.try_to_load_from_cache(reference, "tokenizer_config.json"), str):
            return None  # not cached: transformers is not even imported
    from transformers import AutoTokenizer

    try:
        if local:
            return AutoTokenizer.from_pretrained(models.resolve(reference))
        return AutoTokenizer.from_pretrained(reference, local_files_only=True)
    except (OSError, ValueError) as error:
        log.info("budgets: no tokenizer for %s here (%s); prompts are estimated from their length", reference,
                 str(error).splitlines()[0])
        return None


def prompt_tokens(spec: JobSpec, prompt: str) -> int:
    """Tokens of ``prompt`` as the engine sends it: one user message in the model's chat template."""
    found = tokenizer(spec.model.name)
    if found is None:
        return math.ceil(len(prompt) / chars_per_token(spec.languages))
    return len(engine.chat_ids(found, prompt))


def blame(spec: JobSpec, name: str) -> str:
    """The field to change when ``name``'s prompt and answer do not fit: its largest part (in
    estimated tokens) that a spec field sets."""
    per_token = chars_per_token(spec.languages)
    parts = {"instruction": len(spec.instruction) / per_token,
             **{f"labels[{i}].desc": len(label.desc) * (len(spec.labels) + 1) / per_token
                for i, label in enumerate(spec.labels)}}
    if name.startswith("tree/") or name == "generate":
        parts["sampling.max_tokens"] = spec.sampling.max_tokens
    if name.startswith("tree/"):
        parts["sampling.max_item_chars"] = spec.sampling.max_item_chars * 3 / per_token
    if name == "label_check/llm":
        parts["sampling.max_text_chars"] = spec.sampling.text_chars(spec.languages) / per_token
    return max(parts, key=lambda field: parts[field])


def check(spec: JobSpec, passes: dict[str, pa.Table]) -> dict[str, int]:
    """ConfigError naming the field and the fix unless every pass's longest prompt and answer
    budget fit ``model.max_model_len``; else each pass's longest prompt in tokens. ``passes``:
    each LLM pass's longest requests, by name (``Stage.longest_requests``)."""
    limit, longest = spec.model.max_model_len, {}
    for name, requests in passes.items():
        if not requests.num_rows:
            continue
        sizes = [(prompt_tokens(spec, prompt), budget)
                 for prompt, budget in zip(requests["prompt"].to_pylist(), requests["max_tokens"].to_pylist())]
        prompt, budget = max(sizes, key=sum)
        longest[name] = prompt
        if prompt + budget > limit:
            field = blame(spec, name)
            fix = f"{'lower' if field.startswith('sampling.') else 'shorten'} {field} or raise model.max_model_len"
            raise ConfigError(
                f"{field}: the {name} prompt takes {prompt:,} tokens and its answer up to {budget:,}, over "
                f"model.max_model_len {limit:,}; {fix}")
    return longest
