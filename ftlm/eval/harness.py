"""Benchmarks through EleutherAI's lm-evaluation-harness (lm-eval 0.4.x) on ftlm's own model, without exporting.

    ftlm-eval <run dir | checkpoint | ftlm model dir> --tasks kobest_copa,haerae_history [--num-fewshot 5]
              [--limit 100] [--batch-size 8] [--include-path my_tasks/] [--json results.json]

`FtlmLM` is registered with lm-eval as the model `ftlm`. loglikelihood and loglikelihood_rolling run in batches
of requests sorted by length (longest first) and right-padded; generate_until decodes greedily with the KV cache
and stops at the task's stop sequences. Requests are tokenized exactly as lm-eval's `hf` model does (context and
continuation encoded together, then split; an empty context is the end-of-text token), so the numbers equal
`lm_eval --model hf` on the ftlm-export of the same model.

Datasets come from the local Hugging Face datasets cache only (HF_DATASETS_OFFLINE=1 unless the environment says
otherwise): every task is built before the model is loaded, and one whose data is not cached fails at once, naming
the dataset and the command that fetches it. Metrics that lm-eval would download through Hugging Face `evaluate`
(KoBEST's f1) are computed locally.

run_tasks() does the same on a live model during training. Under ZeRO-3 every rank must run every forward pass
(parameters are gathered collectively), so every rank takes part: the batches are split across ranks, each forward
pass is paired with one on every other rank (a rank with nothing left runs a one-token pass), and the results are
gathered, so every rank returns the same numbers. A rank whose task raises says so in the next of those pairings, so
the other ranks stop that task too instead of waiting for it forever; the task is then skipped on every rank.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import logging
import os
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist

INSTALL = "pip install 'ftlm[eval]'  (or: pip install 'lm-eval>=0.4.9,<0.5' 'huggingface-hub<1')"
LIST_TASKS = "`lm-eval ls tasks` lists them"
TRUE = {"1", "ON", "YES", "TRUE"}
NOT_METRICS = {"alias", "name", "sample_len", "sample_count"}  # what lm-eval keeps beside the metrics

log = logging.getLogger(__name__)


def offline() -> bool:
    """Datasets from the local cache only: the default; HF_DATASETS_OFFLINE=0 lets lm-eval download them."""
    return os.environ.get("HF_DATASETS_OFFLINE", "1").strip().upper() in TRUE


def _go_offline() -> None:
    # datasets reads HF_DATASETS_OFFLINE when first imported: set it before lm-eval imports datasets. Only datasets
    # goes offline (HF_HUB_OFFLINE stays as it is, for whatever else the process downloads).
    if not offline():
        return
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "datasets" in sys.modules:  # imported before us (by another library): tell it directly
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True


_go_offline()
try:
    # lm-eval fills its model registry lazily, only while it is empty: fill it before adding ours, or its own
    # models (hf, vllm, ...) could no longer be found by name.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:
    raise ImportError(f"lm-eval is not installed ({e}); install it with: {INSTALL}") from e

from ftlm.model import KVCache  # noqa: E402  (after the environment above)


class PeerFailed(RuntimeError):
    """Another rank's task raised: this rank stops the task too (its next collective would never be answered)."""

    def __init__(self, rank: int):
        super().__init__(f"rank {rank} stopped the task with an error")
        self.rank = rank


def _collective(method):
    """For FtlmLM's request methods under shard=(rank, world): an exception on this rank is announced to the others
    (in the all-reduce they are waiting in, see FtlmLM._sync) before it propagates, once, however deep it began."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        outermost, self._in_request = not self._in_request, True
        try:
            return method(self, *args, **kwargs)
        except PeerFailed:
            raise
        except Exception:
            if outermost:
                self._announce_failure()
            raise
        finally:
            if outermost:
                self._in_request = False

    return wrapper


class HarnessError(RuntimeError):
    """A benchmark that cannot run as asked; the message names the task, dataset or path.

    From run_tasks: `results` holds the tasks that did run, `failures` maps each failed task to its error.
    """

    def __init__(self, message: str, results: dict | None = None, failures: dict | None = None):
        super().__init__(message)
        self.results = results or {}
        self.failures = failures or {}


# -- the model ---------------------------------------------------------------------------------------------------
@register_model("ftlm")
class FtlmLM(TemplateLM):
    """lm-eval's model interface over an ftlm GPT (or a DeepSpeed engine holding one).

    lm-eval itself always sees one process (rank 0 of 1): `shard=(rank, world_size)` splits the batches across the
    ranks of a training job here instead, and every rank gets every result back.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model=None,
        tokenizer=None,
        batch_size: int | str | None = 8,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        max_gen_toks: int = 256,
        shard: tuple[int, int] = (0, 1),
        **_lm_eval_args,  # max_batch_size and the like, which do not apply
    ):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("the ftlm model needs pretrained=<run dir | checkpoint | ftlm model dir>")
            from ftlm.checkpoint import load, resolve_device, resolve_dtype

            dev = resolve_device(str(device or "auto"))
            loaded = load(pretrained, device=dev, dtype=resolve_dtype(dtype, dev))
            model, tokenizer, device = loaded.model, loaded.tokenizer, dev
        if tokenizer is None:
            raise ValueError("the ftlm model needs its tokenizer (ftlm.data.tokenizer.Tokenizer)")
        try:
            self._batch_size = int(batch_size if batch_size is not None else 8)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be a number of requests, not {batch_size!r}") from None
        if self._batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.cfg = getattr(model, "module", model).cfg  # a DeepSpeed engine keeps the GPT as .module
        param = next(model.parameters())
        self._device = torch.device(device) if device not in (None, "auto") else param.device
        self._dtype = param.dtype
        self._max_gen_toks = int(max_gen_toks)
        self._shard_rank, self._shard_world = shard
        self._warned: set[str] = set()
        self._in_request = False  # inside a request method (see _collective)

    # lm-eval's view: one process
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "ftlm"

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and each rolling window) starts from, as lm-eval's hf model on the export."""
        return self.tokenizer.prefix_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """A Llama-style tokenizer's BOS first (every training document began with it), unless the text starts with
        it already or lm-eval asks for no special tokens: the exported tokenizer's defaults, as the hf model sees
        them. ftlm's byte-level tokenizers add nothing."""
        start = self.tokenizer.document_start
        if add_special_tokens is None and start:
            add_special_tokens = not string.startswith(self.tok_decode(start, skip_special_tokens=False))
        ids = (start if add_special_tokens else []) + self.tokenizer.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    # -- pairing forward passes across ranks ---------------------------------------------------------------------
    # Each forward pass (and each step of a rank's drain) is preceded by one all-reduce of (working, failed rank + 1)
    # with MAX. A rank that raises between two forward passes sends its failure in place of its next all-reduce;
    # every other rank is waiting in exactly that all-reduce (a forward pass needs all ranks' previous all-reduce),
    # so it learns of the failure there and raises PeerFailed instead of waiting for a forward pass that never comes.
    def _sync(self, working: bool) -> bool:
        """One all-reduce per forward pass: whether any rank still has a real one to run."""
        if self._shard_world == 1:
            return working
        flag = torch.tensor([int(working), 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        still_working, failed = flag.tolist()
        if failed:
            raise PeerFailed(failed - 1)
        return bool(still_working)

    def _announce_failure(self) -> None:
        if self._shard_world > 1:
            dist.all_reduce(torch.tensor([0, self._shard_rank + 1], device=self.device), op=dist.ReduceOp.MAX)

    def _forward(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) logits."""
        self._sync(True)
        logits, _ = self.model(ids, cache=cache) if cache is not None else self.model(ids)
        return logits

    def _drain(self) -> None:
        """After this rank's last forward pass: one-token passes while any other rank still runs real ones."""
        while self._sync(False):
            self.model(torch.full((1, 1), self.eot_token_id, dtype=torch.long, device=self.device))

    def _mine(self, batches: list) -> list:
        return batches[self._shard_rank :: self._shard_world]

    def _gather(self, done: dict) -> dict:
        if self._shard_world == 1:
            return done
        parts: list = [None] * self._shard_world
        dist.all_gather_object(parts, done)
        return {k: v for part in parts for k, v in part.items()}

    # -- loglikelihood ---------------------------------------------------------------------------------------------
    @_collective
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    @_collective
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log p(continuation), greedy).

        Batches of the longest requests first, right-padded; a request longer than the model's context keeps its
        last max_seq_len + 1 tokens, as lm-eval's hf model does.
        """
        from tqdm import tqdm

        n_ctx = self.max_length
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][1]) - len(requests[i][2]), i))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        done: dict[int, tuple[float, bool]] = {}
        with torch.no_grad():
            for batch in tqdm(self._mine(batches), desc="loglikelihood", unit="batch", disable=disable_tqdm):
                rows = []
                for i in batch:
                    _, context, continuation = requests[i]
                    if not 0 < len(continuation) <= n_ctx:
                        raise ValueError(
                            f"a continuation of {len(continuation)} tokens cannot be scored with "
                            f"model.max_seq_len={n_ctx}"
                        )
                    if len(context) + len(continuation) > n_ctx + 1:
                        self._warn_once(
                            "truncate", "requests longer than the model's %d tokens lose their start", n_ctx
                        )
                    rows.append((context + continuation)[-(n_ctx + 1) :][:-1])
                ids = torch.full((len(rows), max(map(len, rows))), self.eot_token_id, dtype=torch.long)  # (B, T)
                for r, row in enumerate(rows):
                    ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
                logits = self._forward(ids.to(self.device))  # (B, T, V)
                for r, i in enumerate(batch):
                    cont = torch.tensor(requests[i][2], dtype=torch.long, device=self.device)  # (C,)
                    end = len(rows[r])
                    logp = logits[r, end - len(cont) : end].float().log_softmax(-1)  # (C, V)
                    score = float(logp.gather(1, cont[:, None]).sum())
                    greedy = bool((logp.argmax(-1) == cont).all())
                    done[i] = (score, greedy)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], done[i])
            self._drain()
        done = self._gather(done)
        return [done[i] for i in range(len(requests))]

    @_collective
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts in disjoint windows of max_seq_len tokens, the first after end-of-text."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            pieces = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, pieces):
                windows.append((None, context, continuation))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (score, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[r] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -------------------------------------------------------------------------------------------------
    @_collective
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations with the KV cache, cut at the first stop sequence (the task's `until`, and always
        end-of-text). Prompts of equal length share a batch; a prompt is cut from the left to leave room for
        max_gen_toks new tokens."""
        from tqdm import tqdm

        eot_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prepared = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            if eot_text not in until:
                until.append(eot_text)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                self._warn_once("sample", "the ftlm model decodes greedily; ignoring do_sample/temperature %s", kwargs)
            max_new = max(1, min(max_new, self.max_length - 1))
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.eot_token_id]
            prepared.append((prompt, until, max_new))
        order = sorted(range(len(prepared)), key=lambda i: (-len(prepared[i][0]), prepared[i][2], i))
        batches: list[list[int]] = []
        for i in order:
            last = batches[-1] if batches else None
            key = (len(prepared[i][0]), prepared[i][2])
            if last and len(last) < self.batch_size and (len(prepared[last[0]][0]), prepared[last[0]][2]) == key:
                last.append(i)
            else:
                batches.append([i])
        done: dict[int, str] = {}
        with torch.no_grad():
            for batch in tqdm(self._mine(batches), desc="generate_until", unit="batch", disable=disable_tqdm):
                texts = self._greedy(
                    [prepared[i][0] for i in batch], [prepared[i][1] for i in batch], prepared[batch[0]][2]
                )
                for i, text in zip(batch, texts):
                    done[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            self._drain()
        done = self._gather(done)
        return [done[i] for i in range(len(requests))]

    def _greedy(self, prompts: list[list[int]], untils: list[list[str]], max_new: int) -> list[str]:
        """Prompts of one length (B, P) -> B greedy continuations, each cut before its first stop sequence."""
        b, p = len(prompts), len(prompts[0])
        cache = KVCache(self.cfg, b, p + max_new, self.device, self._dtype)
        step = torch.tensor(prompts, dtype=torch.long, device=self.device)  # (B, P), then (B, 1)
        out: list[list[int]] = [[] for _ in range(b)]
        finished = [False] * b
        for _ in range(max_new):
            next_ids = self._forward(step, cache=cache)[:, -1].float().argmax(-1)  # (B,)
            for r, token in enumerate(next_ids.tolist()):
                if finished[r]:
                    continue
                out[r].append(token)
                text = self.tok_decode(out[r], skip_special_tokens=False)
                finished[r] = token == self.eot_token_id or any(s and s in text for s in untils[r])
            if all(finished):
                break
            step = next_ids.view(b, 1)
        texts = []
        for ids, until in zip(out, untils):
            text = self.tok_decode(ids)
            for stop in until:  # as lm-eval's hf model: everything from the first stop sequence on is dropped
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


# -- tasks -------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def _checked_path(include_path: str | Path | None) -> str | None:
    if include_path is None:
        return None
    p = Path(str(include_path)).expanduser().resolve()
    if not p.is_dir():
        raise HarnessError(f"--include-path {p}: not a directory")
    if not any(p.glob("**/*.yaml")):
        raise HarnessError(f"--include-path {p}: no .yaml task files in it or below it")
    return str(p)


def task_manager(include_path: str | Path | None = None, tasks: list[str] | None = None):
    """lm-eval's index of tasks, built once per path. When every one of `tasks` is defined under include_path, an
    index of that folder alone (lm-eval's own ~15,000 task files take seconds to index)."""
    path = _checked_path(include_path)
    if path is not None and tasks is not None:
        own = _task_manager(path, False)
        if all(t in own.all_tasks for t in tasks):
            return own
    return _task_manager(path, True)


def _is_yaml_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def check_tasks(tasks: str | list[str], include_path: str | Path | None = None) -> list[str]:
    """The task names to run: comma-separated or a list; `*` patterns expand (kmmlu*). Raises HarnessError naming
    every unknown task with the closest known names. Reads YAML only: cheap enough for a config check."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise HarnessError(f"no task given: name lm-eval tasks, e.g. --tasks kobest_copa,haerae_history ({LIST_TASKS})")
    path = _checked_path(include_path)
    indexes = ([_task_manager(path, False)] if path else []) + [None]  # None: the full index, built only if needed
    found, unknown = [], []
    for name in names:
        for i, tm in enumerate(indexes):
            if tm is None:
                tm = indexes[i] = _task_manager(path, True)
            matched = [name] if name in tm.all_tasks else fnmatch.filter(tm.all_tasks, name) if "*" in name else []
            if matched or _is_yaml_file(name):  # lm-eval also takes a task's YAML file itself
                found.extend(matched or [name])
                break
        else:
            close = difflib.get_close_matches(name, indexes[-1].all_tasks, n=5, cutoff=0.6)
            unknown.append(f"{name} (closest: {', '.join(close)})" if close else f"{name} (nothing close)")
    if unknown:
        where = f"lm-eval's tasks and {path}" if path else "lm-eval's tasks (--include-path adds yours)"
        raise HarnessError(f"unknown task(s) in {where}: {'; '.join(unknown)}. {LIST_TASKS}")
    return list(dict.fromkeys(found))


def _local_metrics() -> dict:
    """What lm-eval would fetch as Hugging Face `evaluate` scripts (hf_evaluate: true), computed here offline."""
    from sklearn.metrics import accuracy_score, f1_score

    def f1(predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None, **_):
        value = f1_score(
            references, predictions, labels=labels, pos_label=pos_label, average=average, sample_weight=sample_weight
        )
        return {"f1": float(value) if getattr(value, "size", 1) == 1 else value.tolist()}

    def accuracy(predictions, references, normalize=True, sample_weight=None, **_):
        return {
            "accuracy": float(accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight))
        }

    from lm_eval.api.metrics import exact_match_hf_evaluate

    return {"f1": f1, "accuracy": accuracy, "exact_match": exact_match_hf_evaluate}


@contextlib.contextmanager
def local_metrics():
    """lm-eval's metric lookup, answering hf_evaluate metrics we have locally without a download."""
    import lm_eval.api.registry as registry
    import lm_eval.api.task as task_module

    local = _local_metrics()
    original = registry.get_metric

    def get_metric(name, hf_evaluate_metric: bool = False):
        if hf_evaluate_metric and name in local:
            return local[name]
        return original(name, hf_evaluate_metric)

    patched = [m for m in (registry, task_module) if getattr(m, "get_metric", None) is original]
    for module in patched:
        module.get_metric = get_metric
    try:
        yield
    finally:
        for module in patched:
            module.get_metric = original


@contextlib.contextmanager
def _recording_dataset_loads():
    """The (path, name) of every datasets.load_dataset call inside, so a failure can name the dataset."""
    import datasets

    seen: list[tuple[str, str | None]] = []
    original = datasets.load_dataset

    def load_dataset(path, name=None, *args, **kwargs):
        seen.append((str(path), kwargs.get("name", name)))
        return original(path, name, *args, **kwargs)

    datasets.load_dataset = load_dataset
    try:
        yield seen
    finally:
        datasets.load_dataset = original


def _missing_data(task: str, dataset: tuple[str, str | None] | None, error: Exception) -> str:
    import datasets

    text = f"{type(error).__name__}: {error}"
    unreachable = isinstance(error, ConnectionError) or "offline" in text.lower() or "couldn't reach" in text.lower()
    if dataset is None or not unreachable:
        return f"task {task} cannot be loaded: {text}"
    path, name = dataset
    call = f"datasets.load_dataset({path!r}" + (f", {name!r}" if name else "") + ")"
    return (
        f"task {task}: dataset {path}{f' ({name})' if name else ''} is not in the local Hugging Face datasets cache "
        f"({datasets.config.HF_DATASETS_CACHE}) and downloads are off (HF_DATASETS_OFFLINE=1). On a machine with "
        f'network run\n    HF_DATASETS_OFFLINE=0 python -c "import datasets; {call}"\n'
        f"and copy its Hugging Face cache (HF_HOME, default ~/.cache/huggingface) here, or run ftlm-eval with "
        f"HF_DATASETS_OFFLINE=0 where the network is reachable."
    )


def load_tasks(names: list[str], include_path: str | Path | None = None):
    """Build every task once, reading its data, so that a missing dataset fails before any model is loaded.
    Returns the task index that built them (pass it to evaluate)."""
    tm = task_manager(include_path, names)
    with local_metrics(), _recording_dataset_loads() as seen:
        for name in names:
            seen.clear()
            try:
                try:
                    _build(tm, name)
                except KeyError:  # a task of the include path that refers to one of lm-eval's own
                    if tm is _task_manager(_checked_path(include_path), True):
                        raise
                    tm = _task_manager(_checked_path(include_path), True)
                    _build(tm, name)
            except Exception as e:  # datasets, YAML and user code raise anything
                raise HarnessError(_missing_data(name, seen[-1] if seen else None, e)) from e
    return tm


def _build(tm, name: str) -> None:
    if hasattr(tm, "load"):
        tm.load([name])
    else:  # lm-eval < 0.4.10
        from lm_eval.tasks import get_task_dict

        get_task_dict([name], tm)


def evaluate(
    lm: FtlmLM,
    tasks: list[str],
    manager=None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 100000,
) -> dict:
    """lm-eval's own results dict (results, groups, configs, versions, n-shot, higher-is-better, n-samples, config)."""
    from lm_eval import simple_evaluate

    with local_metrics(), _one_process_view():
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            batch_size=lm.batch_size,
            limit=limit,
            task_manager=manager or task_manager(None, tasks),
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
        )
    results.pop("samples", None)
    results.get("config", {})["model"] = "ftlm"
    return results


@contextlib.contextmanager
def _one_process_view():
    """lm-eval returns results only where LOCAL_RANK is 0 (or unset); every rank of a job is lm-eval's one process
    here (FtlmLM splits the work itself), so each rank gets the results."""
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = saved


def metrics_of(results: dict) -> dict[str, dict[str, float]]:
    """task -> metric -> value from lm-eval's results dict; `acc,none` is `acc`, another filter is `metric_filter`;
    standard errors, counts and text are left out."""
    out: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, values in results.get(section, {}).items():
            for key, value in values.items():
                metric, _, flt = key.partition(",")
                if metric.endswith("_stderr") or metric in NOT_METRICS or not isinstance(value, (int, float)):
                    continue
                out.setdefault(task, {})[metric if flt in ("", "none") else f"{metric}_{flt}"] = float(value)
    return out


@contextlib.contextmanager
def _rng_kept():
    """simple_evaluate seeds python, numpy and torch; training's random streams continue as if it never ran."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _describe(error: Exception) -> str:
    return str(error) if isinstance(error, HarnessError) else f"{type(error).__name__}: {error}"


def _first_error(error: Exception | None, rank: int, world_size: int) -> str | None:
    """The error of the first rank that has one (the same answer on every rank), or None if no rank has one. A
    rank's own error comes before the PeerFailed of the ranks that stopped because of it."""
    mine = None if error is None else _describe(error)
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return mine
    errors: list = [None] * world_size
    dist.all_gather_object(errors, (mine, isinstance(error, PeerFailed)))
    failed = [r for r, (message, _) in enumerate(errors) if message is not None]
    if not failed:
        return None
    first = min(failed, key=lambda r: (errors[r][1], r))
    return errors[first][0] if first == rank else f"on rank {first}: {errors[first][0]}"


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None,
    device,
    rank: int,
    world_size: int,
    include_path: str | Path | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """lm-eval tasks on a live model (a GPT or its DeepSpeed engine): task -> metric -> value, the same on every rank.

    Every rank must call it (the batches are split across ranks; under ZeRO-3 each forward pass is collective).
    limit: examples per task (None: all). Each task runs on its own; a task that fails is skipped and, after the
    others ran, HarnessError is raised with `.results` (the tasks that ran) and `.failures` (task -> error).
    The model is in eval mode meanwhile and its mode, and every random generator's state, are restored.
    """
    names = check_tasks(tasks, include_path)
    lm = FtlmLM(model=model, tokenizer=tokenizer, batch_size=batch_size, device=device, shard=(rank, world_size))
    results: dict[str, dict[str, float]] = {}
    failures: dict[str, str] = {}
    was_training = model.training
    model.eval()
    try:
        with _rng_kept():
            for name in names:
                try:
                    manager, error = load_tasks([name], include_path), None
                except Exception as e:  # a benchmark must never stop training: report it, go on
                    manager, error = None, e
                # Every rank must run a task or none may: under ZeRO-3 each forward pass is collective, so a rank
                # whose node lacks the task's data (the usual one-rank failure) would leave the others waiting.
                message = _first_error(error, rank, world_size)
                if message is not None:
                    failures[name] = message
                    continue
                try:
                    out, error = evaluate(lm, [name], manager, limit, num_fewshot, bootstrap_iters=0), None
                except Exception as e:  # on one rank: the others stopped too (PeerFailed), see FtlmLM._sync
                    out, error = None, e
                message = _first_error(error, rank, world_size)  # every rank skips the task if any rank failed
                if message is not None:
                    failures[name] = message
                    continue
                results.update(metrics_of(out))
    finally:
        model.train(was_training)
    if failures:
        raise HarnessError(
            "benchmark task(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()), results, failures
        )
    return results
