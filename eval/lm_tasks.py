"""Zero-shot tasks through lm-evaluation-harness's own Python API.

Offline, each task is the stock lm-eval task with its data read from the shared JSON Lines
files: `eval/tasks/<task>.yaml` includes the stock YAML and overrides only the data source.
Those templates hold two placeholders filled in at run time (never an absolute path in the
repository): `@LM_EVAL_TASKS@` (the installed lm_eval/tasks folder) and `@DATA_DIR@` (the
offline data folder). Online (local file absent) the stock task itself is used.
"""

import difflib
import math
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from retconvert.errors import RetconvertError

TEMPLATES = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASKS = ("lambada_openai", "piqa", "arc_easy", "boolq", "winogrande")
# accuracy of a uniform guess, for the multiple-choice tasks (ARC-Easy: a handful of its
# questions have 3 or 5 choices, the rest 4)
CHANCE = {"piqa": 1 / 2, "winogrande": 1 / 2, "arc_easy": 1 / 4, "boolq": 1 / 2}


def binomial_stderr(p: float, n: int) -> Optional[float]:
    """Standard error of an accuracy p measured on n independent examples, sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else None


PREFIX = "retconvert_"


def template_info(task: str) -> Optional[Tuple[str, str]]:
    """(data file relative to the data folder, split) of a task's offline template, or None."""
    path = TEMPLATES / f"{task}.yaml"
    if not path.is_file():
        return None
    m = re.search(r'^\s+(\w+): "@DATA_DIR@/([^"]+)"', path.read_text(), re.M)
    if m is None:
        raise RetconvertError(f"{path} has no data_files entry with @DATA_DIR@; the template is broken")
    return m.group(2), m.group(1)


def check_tasks(tasks: List[str]):
    """Raise RetconvertError (`--tasks`) naming each task lm-eval does not know, with the nearest
    known names, before any model loads. A task with an offline template (eval/tasks) is known;
    the others are looked up in lm-eval's index of stock tasks (about 10 s to build)."""
    others = [t for t in tasks if not (TEMPLATES / f"{t}.yaml").is_file()]
    if not others:
        return
    from lm_eval.tasks import TaskManager

    known = TaskManager().all_tasks
    unknown = [t for t in others if t not in known]
    if unknown:
        near = sorted({n for t in unknown for n in difflib.get_close_matches(t, known, n=3)})
        hint = f"did you mean {', '.join(near)}?" if near else f"e.g. {', '.join(DEFAULT_TASKS)}"
        raise RetconvertError(f"--tasks: lm-eval has no task {', '.join(unknown)}; check the names ({hint}) "
                              "or pass --tasks '' for none")


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def materialize(tasks, data_dir: Path, dest: Path) -> Dict[str, str]:
    """Write resolved offline task YAMLs into `dest` for the tasks whose data file exists.

    Returns {stock task name: registered offline name}; tasks left out run online.
    """
    stock = lm_eval_tasks_dir()
    registered = {}
    for task in tasks:
        info = template_info(task)
        if info is None or not (Path(data_dir) / info[0]).is_file():
            continue
        text = (TEMPLATES / f"{task}.yaml").read_text()
        included = re.search(r'include: "@LM_EVAL_TASKS@/([^"]+)"', text)
        if included and not (stock / included.group(1)).is_file():
            raise RetconvertError(f"lm-eval {_lm_eval_version()} has no {included.group(1)}; "
                                  "install the lm-eval version in pyproject.toml or update eval/tasks")
        for placeholder, value in (("@LM_EVAL_TASKS@", stock), ("@DATA_DIR@", Path(data_dir).resolve())):
            value = value.as_posix()
            if '"' in value or "\\" in value:
                raise RetconvertError(f"path {value} has a quote or backslash; move the data to a plainer path")
            text = text.replace(placeholder, value)
        (Path(dest) / f"{task}.yaml").write_text(text)
        registered[task] = PREFIX + task
    return registered


def _lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "?")


@contextmanager
def task_setup(tasks, data_dir: Optional[Path]) -> Iterator[Tuple[object, Dict[str, str], Dict[str, str]]]:
    """Yield (TaskManager, {task: lm-eval name}, {task: "offline"|"online"})."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="retconvert-tasks-") as tmp:
        registered = materialize(tasks, data_dir, Path(tmp)) if data_dir is not None else {}
        # Only offline tasks: our YAMLs include the stock files by path, so the (slow) index of
        # every stock task is not needed.
        manager = TaskManager(include_path=tmp if registered else None,
                              include_defaults=len(registered) < len(tasks))
        names = {t: registered.get(t, t) for t in tasks}
        sources = {t: "offline" if t in registered else "online" for t in tasks}
        missing = [t for t, n in names.items() if n not in manager.all_tasks]
        if missing:
            raise RetconvertError(f"lm-eval does not know task(s) {', '.join(missing)}; "
                                  f"check the names (e.g. {', '.join(DEFAULT_TASKS)})")
        yield manager, names, sources


def zero_shot(model, tokenizer, tasks: List[str], setup, limit: Optional[int] = None, batch_size: int = 8,
              max_length: Optional[int] = None, log=print) -> Dict[str, dict]:
    """{task: {"acc", "acc_norm"?, "perplexity"?, "n", "correct", "doc_ids", "source"}} for an
    already loaded model; "correct": 0/1 per example (acc) for the documents "doc_ids", so that
    two models' answers to the same examples can be compared pairwise.

    `setup` is what `task_setup` yields (built once, shared by all models).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager, names, sources = setup
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    log(f"zero-shot {', '.join(f'{t} ({sources[t]})' for t in tasks)}"
        + (f", at most {limit} examples each" if limit else ""))
    res = lm_eval.simple_evaluate(model=lm, tasks=[names[t] for t in tasks], task_manager=manager,
                                  limit=limit, num_fewshot=0, log_samples=True, bootstrap_iters=0,
                                  verbosity="WARNING")
    out = {}
    for task in tasks:
        name = names[task]
        metrics = res["results"].get(name, {})
        entry = {}
        for key in ("acc", "acc_norm", "perplexity"):
            value = metrics.get(f"{key},none")
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                entry[key] = float(value)
        n = res.get("n-samples", {}).get(name, {})
        entry["n"] = int(n.get("effective", n.get("original", 0)) or 0)
        samples = sorted(res.get("samples", {}).get(name, []), key=lambda x: x["doc_id"])
        if samples and all("acc" in x for x in samples):
            entry["correct"] = [int(x["acc"]) for x in samples]
            entry["doc_ids"] = [int(x["doc_id"]) for x in samples]
        entry["source"] = sources[task]
        entry["lm_eval_task"] = name
        entry["unit"] = "acc, acc_norm: fraction correct; perplexity: per-word target perplexity (lambada)"
        out[task] = entry
    return out
