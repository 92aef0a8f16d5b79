"""Text sources: local json/jsonl/txt files (offline) or a Hugging Face dataset (streamed).

A source spec is either a path to a local file, or `hf:NAME[:CONFIG][:SPLIT]` such as
`hf:allenai/c4:en:validation`. The same iterator feeds calibration, distillation and
evaluation, so offline runs exercise the code that real users run.
"""

import json
from pathlib import Path
from typing import Iterator, List

from retconvert.errors import RetconvertError


def iter_texts(spec: str, text_field: str = "text") -> Iterator[str]:
    """Yield documents from a local file or a streamed HF dataset, in order."""
    if spec.startswith("hf:"):
        yield from _iter_hf(spec[3:], text_field)
        return
    path = Path(spec)
    if not path.is_file():
        raise RetconvertError(
            f"text source {spec} is not a file; give a .jsonl/.json/.txt path or hf:NAME:CONFIG:SPLIT")
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RetconvertError(
                        f"{path}:{line_no} is not valid JSON ({e.msg}); expected one JSON object a line") from None
                if text_field not in row:
                    raise RetconvertError(
                        f"{path}:{line_no} has no {text_field!r} field; pass the right text field name")
                yield row[text_field]
    else:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")


def _iter_hf(spec: str, text_field: str) -> Iterator[str]:
    import datasets

    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config, split=split or "train", streaming=True)
    except Exception as e:  # network, unknown name, missing config
        raise RetconvertError(f"cannot open dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "check the name and your connection, or pass a local .jsonl file") from None
    for row in ds:
        yield row[text_field]


def token_stream(texts, tokenizer, max_tokens: int, separator_id=None) -> List[int]:
    """Tokenise documents and join them, separated by `separator_id` (e.g. EOS), up to max_tokens."""
    ids: List[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if separator_id is not None:
            ids.append(separator_id)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]
