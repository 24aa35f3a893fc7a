"""The parts of a run the training loop calls after each step; each owns its schedule and its state.

    Checkpointer   saves every trainer.save_interval steps, after the last step and on a stop signal
    Validator      validation loss and bits per byte per stream every trainer.eval_interval steps
    Sampler        greedy text samples every trainer.sample_interval steps and at the end
    StopSignal     SIGTERM / SIGINT, agreed over the ranks at log and save boundaries only (with the loss check)
    Forgetting     with trainer.init_from: each stream's bpb against the starting model's
    Bench          lm-evaluation-harness tasks every trainer.bench_interval steps

Every component is called on every rank at the same steps (their work is collective under ZeRO-3).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from ftlm.checkpoint import TrainerState
from ftlm.train import checkpoint
from ftlm.train.metrics import Metrics, due

log = logging.getLogger("ftlm.train")


class StopSignal:
    """SIGTERM (sent by SLURM before preemption) or SIGINT: finish the step, save, exit cleanly.

    The flag is agreed over the ranks (an all_reduce and a host sync) only at the steps `check` is asked about.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.requested = True
        log.warning("received %s: saving a checkpoint at the next log or save step, then exiting", _name(signum))

    def any_rank(self, nonfinite: torch.Tensor | None = None) -> tuple[bool, bool]:
        """(whether any rank was asked to stop, whether any rank's `nonfinite` count is above 0): one collective,
        which the loss check shares. `nonfinite` ((1,) on the device) is reset to 0."""
        flags = torch.tensor([1.0 if self.requested else 0.0, 0.0], device=self.device)
        if nonfinite is not None:
            flags[1:] = nonfinite.float().clamp(max=1)
            nonfinite.zero_()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad = flags.tolist()
        return stop > 0, bad > 0

    def close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)


def _name(signum: int) -> str:
    return signal.Signals(signum).name


class Checkpointer:
    """Writes checkpoints of the engine, the trainer state and the data loader's position."""

    def __init__(
        self, engine, root: Path, state: TrainerState, loader, every: int, max_steps: int, keep_last: int, rank
    ):
        self.engine, self.root, self.state, self.loader = engine, root, state, loader
        self.every, self.max_steps, self.keep_last, self.rank = every, max_steps, keep_last, rank

    def due(self, step: int) -> bool:
        return due(step, self.every, self.max_steps) or step == self.max_steps  # a final checkpoint always

    def save(self) -> Path:
        return checkpoint.save(
            self.engine,
            self.root,
            self.state.step,
            self.state,
            self.loader.state_dict(),  # a collective: every rank at the same point
            self.keep_last,
            self.rank,
        )


class Validator:
    """Validation loss and bits per byte per stream, on every rank's share of each validation stream."""

    def __init__(self, model, loaders: dict, device, token_bytes, every: int, max_steps: int, metrics: Metrics):
        self.model, self.loaders, self.device, self.token_bytes = model, loaders, device, token_bytes
        self.every, self.max_steps, self.metrics = every, max_steps, metrics
        self.history: dict[int, dict[str, float]] = {}

    def due(self, step: int) -> bool:
        return due(step, self.every, self.max_steps)

    def run(self, step: int, report: bool = True) -> dict[str, float]:
        from ftlm.eval.loss import evaluate

        values = evaluate(self.model, self.loaders, self.device, self.token_bytes)
        if report:
            self.metrics.scalars(values, step)
            self.history[step] = values
            log.info(
                "validation at step %d: %s",
                step,
                ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in sorted(values.items())),
            )
        return values


class Forgetting:
    """How much a continued model forgets: each validation stream's bits per byte against the starting model's.

    The start is measured once at step 0; every later validation logs val/<stream>/bpb_delta (relative change).
    """

    def __init__(self, validator: Validator, warn: float, state: TrainerState):
        self.validator, self.warn = validator, warn
        self.last: dict[str, float] = {}
        # The start is kept in the trainer state, so a resumed run compares with the same starting model.
        self.start: dict[str, float] = state.extra.setdefault("forgetting_start", {})
        if state.step == 0:
            values = validator.run(0, report=False)
            self.start.update({k: v for k, v in values.items() if k.endswith("/bpb")})
            validator.metrics.scalars(values, 0)
            log.info(
                "starting model: %s",
                ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in sorted(self.start.items())),
            )

    def after_validation(self, step: int) -> None:
        values = self.validator.history.get(step)
        if not values or not self.start:
            return
        deltas = {
            k.removesuffix("/bpb") + "/bpb_delta": (values[k] - v) / v for k, v in self.start.items() if k in values
        }
        self.validator.metrics.scalars(deltas, step)
        self.last = deltas

    def report(self) -> None:
        if not self.last:
            return
        log.info(
            "forgetting (relative change of bits per byte since step 0): %s",
            ", ".join(f"{k.removeprefix('val/')} {v:+.2%}" for k, v in sorted(self.last.items())),
        )
        worse = {k: v for k, v in self.last.items() if v > self.warn}
        if worse:
            log.warning(
                "forgetting above trainer.forgetting_warn=%g: %s (replay more of that data, or lower trainer.lr)",
                self.warn,
                ", ".join(f"{k.removeprefix('val/').removesuffix('/bpb_delta')} {v:+.2%}" for k, v in worse.items()),
            )


class Sampler:
    """Greedy continuations of trainer.sample_prompts (every rank takes part: ZeRO-3 gathers weights)."""

    def __init__(self, model, tokenizer, prompts, tokens: int, every: int, max_steps: int, metrics: Metrics):
        self.model, self.tokenizer, self.prompts, self.tokens = model, tokenizer, list(prompts), tokens
        self.every, self.max_steps, self.metrics = every, max_steps, metrics

    def due(self, step: int) -> bool:
        return due(step, self.every, self.max_steps) and step < self.max_steps  # the end has its own samples

    def run(self, step: int, show: bool = False) -> dict[str, str]:
        from ftlm.eval.generate import continuation, generate

        out = {}
        for prompt in self.prompts:
            prompt_ids = self.tokenizer.encode_document(prompt)  # BOS first for a Llama-style tokenizer
            ids = generate(self.model, prompt_ids, self.tokens, eos_id=self.tokenizer.eot_id)
            out[prompt] = prompt + continuation(self.tokenizer, prompt_ids, ids)  # as ftlm-generate prints it
        for prompt, text in out.items():
            if show:
                log.info("sample  %r -> %r", prompt, text)
            self.metrics.text(f"samples/{prompt}", text, step)
        return out


class Bench:
    """lm-evaluation-harness tasks on the live model (ftlm.eval.harness); a failing task is logged and skipped.

    Every rank takes part (run_tasks splits the requests over the ranks; under ZeRO-3 each forward is collective).
    """

    def __init__(self, model, tokenizer, t, dist_info, metrics: Metrics):
        self.model, self.tokenizer, self.t, self.d, self.metrics = model, tokenizer, t, dist_info, metrics

    def due(self, step: int) -> bool:
        return bool(self.t.bench_tasks) and due(step, self.t.bench_interval, self.t.max_steps)

    def run(self, step: int) -> dict[str, float]:
        results, failures = self._run(list(self.t.bench_tasks))
        for task, error in failures.items():
            log.warning("benchmark %s failed at step %d and is skipped: %s", task, step, error)
        values = {
            f"bench/{task}/{metric}": float(value)
            for task, metrics in results.items()
            for metric, value in metrics.items()
            if isinstance(value, (int, float))
        }
        if values:
            self.metrics.scalars(values, step)
            shown = ", ".join(f"{k.removeprefix('bench/')} {v:.4f}" for k, v in values.items())
            log.info("benchmarks at step %d: %s", step, shown)
        return values

    def _run(self, tasks: list[str]) -> tuple[dict, dict]:
        """(task -> metric -> value, task -> error); never raises."""
        try:
            from ftlm.eval.harness import HarnessError, run_tasks
        except Exception as e:  # lm-eval missing or broken: say so once per run, keep training
            return {}, {task: f"{type(e).__name__}: {e}" for task in tasks}
        t, d = self.t, self.d

        def run(names):
            return run_tasks(
                self.model, self.tokenizer, names, t.bench_limit, d.device, d.rank, d.world_size, t.bench_include_path
            )

        try:
            return run(tasks), {}
        except HarnessError as e:
            if e.results or e.failures or len(tasks) == 1:
                return e.results, e.failures or {", ".join(tasks): str(e)}
        except Exception as e:
            return {}, {", ".join(tasks): f"{type(e).__name__}: {e}"}
        # Refused before any task ran (an unknown name, say): each on its own, so the others still run.
        results, failures = {}, {}
        for task in tasks:
            r, f = self._run([task])
            results.update(r)
            failures.update(f)
        return results, failures
