"""Load the models to compare: Hub IDs, local folders (RetNet or plain HF), GGUF files, built-in names."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from retconvert.convert.student import DTYPES
from retconvert.errors import RetconvertError



@dataclass
class EvalModel:
    name: str  # what the user typed
    role: str  # "teacher" or "student"
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "builtin", "gguf", "folder", "hub"
    notes: list = field(default_factory=list)

    @property
    def is_retnet(self) -> bool:
        return getattr(self.model.config, "model_type", None) == "retnet"

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> Optional[int]:
        """The positions the model was trained for (None: no stated limit)."""
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def set_retention_mode(self, mode: str):
        if self.is_retnet:
            self.model.config.retention_mode = mode

    @property
    def retention_mode(self) -> Optional[str]:
        return self.model.config.retention_mode if self.is_retnet else None


def load_model(source: str, role: str, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False, allow_pickle: bool = False,
               fallback_tokenizer=None) -> EvalModel:
    """Load `source` in eval mode with its tokenizer (or `fallback_tokenizer` if it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import retconvert  # noqa: F401  # registers the RetNet classes with the Auto classes)
    from retconvert.convert.sources import BUILTIN_TEACHERS, load_teacher

    torch_dtype = DTYPES[dtype]
    path = Path(source).expanduser()
    if source in BUILTIN_TEACHERS or path.suffix == ".gguf" or path.is_file():
        t = load_teacher(source, dtype=torch_dtype, device=device, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code)
        return EvalModel(source, role, t.model, t.tokenizer, t.kind)

    if path.is_dir():
        kind = "folder"
        config_file = path / "config.json"
        if not config_file.is_file():
            raise RetconvertError(f"{path} has no config.json; point at a Hugging Face model folder")
        if not any(path.glob("*.safetensors")) and not allow_pickle:
            raise RetconvertError(f"{path} has no *.safetensors weights; convert them, or pass --allow-pickle "
                                  "for a trusted folder with .bin weights")
        where = str(path)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise RetconvertError(f"{source} is neither an existing folder, a GGUF file, a built-in name nor a Hub ID; "
                              "check the path")
    else:
        kind, where = "hub", source

    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("is it downloaded? without network only the local Hugging Face cache is used"
                if kind == "hub" else "the folder may be incomplete or corrupt")
        raise RetconvertError(f"cannot load {source} as a causal language model ({type(e).__name__}: {first}); "
                              f"{hint}") from None
    notes = []
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as e:
        if fallback_tokenizer is None:
            raise RetconvertError(f"{source} has no loadable tokenizer ({type(e).__name__}); "
                                  "save the teacher's tokenizer into the folder") from None
        tokenizer = fallback_tokenizer
        notes.append("no tokenizer in the folder: the teacher's tokenizer is used")
    model.to(device).eval().requires_grad_(False)
    return EvalModel(source, role, model, tokenizer, kind, notes)
