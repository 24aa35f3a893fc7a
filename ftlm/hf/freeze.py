"""Staged training (trainer.train_only = all | embeddings | new_rows): keep frozen weights bit-identical.

How: two things, each step.
  1. before_step() — after backward, before the optimizer step — zeroes the gradient of every frozen weight
     (whole parameters, or the old rows of the embedding / head). The optimizer therefore never sees a gradient
     for them: Adam's moments stay zero, and gradient clipping measures only what trains.
  2. after_step() writes the saved values back. Needed because decoupled weight decay (AdamW) moves a weight
     even when its gradient is zero; restoring makes the frozen weights exactly the imported ones.

Why not requires_grad=False: DeepSpeed builds its flat fp32 partitions at initialize() from the parameters that
require grad, so unfreezing at trainer.unfreeze_at would need a new engine and optimizer. Why not gradient hooks on
the parameters: under ZeRO-3 a parameter's gradient is reduced and partitioned as soon as it is produced, so the
hook sees a gathered tensor that is then thrown away, and rows must be masked in the partitions instead.

Under ZeRO-3 each rank holds a flat slice (ds_tensor) of every parameter and the fp32 master slice inside the
optimizer; DeepSpeed's local API (deepspeed.utils.safe_get_local_grad / safe_set_local_grad /
safe_set_local_fp32_param) reads and writes exactly those slices, so no rank gathers a full parameter: the frozen
slices are saved once per rank (on the CPU), and the rows a slice covers follow from its offset
rank * slice_size in the flattened parameter. ZeRO-1/2 use the full-tensor API (safe_get_full_grad, ...);
plain PyTorch modules use .grad and .data.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .vocab import ROW_PARAMS

log = logging.getLogger(__name__)

TRAIN_ONLY = ("all", "embeddings", "new_rows")


def freeze_mask(model: nn.Module, train_only: str, n_old_rows: int | None = None) -> dict[str, int | None]:
    """What stays frozen: parameter name -> None (the whole parameter) or k (its first k rows).

    train_only: all (nothing frozen), embeddings (everything but embed.weight / lm_head.weight), new_rows (also
    the first n_old_rows rows of those two). Names are the model's (a DeepSpeed engine's module is unwrapped).
    """
    if train_only not in TRAIN_ONLY:
        raise ValueError(f"trainer.train_only={train_only!r}: not one of {', '.join(TRAIN_ONLY)}")
    if train_only == "all":
        return {}
    if train_only == "new_rows" and not n_old_rows:
        raise ValueError("trainer.train_only=new_rows needs the number of old rows (the source tokenizer's size)")
    module = getattr(model, "module", model)
    mask: dict[str, int | None] = {}
    for name, _ in module.named_parameters():
        if name in ROW_PARAMS:
            if train_only == "new_rows":
                mask[name] = int(n_old_rows)
        else:
            mask[name] = None
    if train_only == "new_rows" and not any(k in ROW_PARAMS for k in mask):
        raise ValueError("trainer.train_only=new_rows: the model has no embed.weight")
    return mask


def _zero3(p) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


def _ds_stage12(p) -> bool:
    # Every rank has the attribute (None where it holds no fragment of p): test presence, not value, so that all
    # ranks take the same path and meet in the same collectives.
    return hasattr(p, "_hp_mapping")


class FrozenWeights:
    """Keeps the weights `freeze_mask` names bit-identical through optimizer steps.

        frozen = FrozenWeights(engine, "new_rows", n_old_rows=32000)   # after deepspeed.initialize
        for each micro step:
            engine.backward(loss)
            frozen.before_step()          # only acts at the gradient-accumulation boundary
            engine.step()
            frozen.after_step()
        frozen.release()                  # at trainer.unfreeze_at: everything trains from then on

    Also works on a plain nn.Module with a torch optimizer (before_step before optimizer.step(), after_step after).
    """

    def __init__(self, model, train_only: str, n_old_rows: int | None = None):
        self.engine = model if hasattr(model, "is_gradient_accumulation_boundary") else None
        module = getattr(model, "module", model)
        self.mask = freeze_mask(module, train_only, n_old_rows)
        self.params = dict(module.named_parameters())
        self.active = bool(self.mask)
        self._saved: dict[str, torch.Tensor] = {}
        self._local: dict[str, torch.Tensor] = {}  # ZeRO-3: bool mask over this rank's flat slice (None: all)
        for name, rows in self.mask.items():
            p = self.params[name]
            if _zero3(p):
                value = self._get_local(p)
                if value is None:
                    continue  # this rank holds no slice (ZeRO-3 never does this, but be safe)
                self._local[name] = self._local_mask(p, rows)
                self._saved[name] = value.detach().to("cpu", copy=True)
            else:
                full = self._get_full(p)
                self._saved[name] = (full if rows is None else full[:rows]).detach().to("cpu", copy=True)
        self._steps = self._global_steps()
        if self.active:
            # Under ZeRO-3 this rank saved its whole slice of each parameter; count only the frozen values in it.
            n = sum(
                int(self._local[k].sum()) if self._local.get(k) is not None else v.numel()
                for k, v in self._saved.items()
            )
            where = " (this rank's slice)" if self._local else ""
            log.info("train_only=%s: %s frozen values%s kept bit-identical until unfreeze", train_only, f"{n:,}", where)

    # -- the parts of a parameter this rank holds --------------------------------------------------------------
    @staticmethod
    def _get_local(p):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)

    @staticmethod
    def _get_full(p) -> torch.Tensor:
        if _ds_stage12(p):
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(p)
        return p.data

    @staticmethod
    def _local_mask(p, rows: int | None) -> torch.Tensor | None:
        """Which elements of this rank's flat slice belong to the frozen rows (None: the whole slice)."""
        if rows is None:
            return None
        import torch.distributed as dist

        size = p.ds_tensor.numel()
        group = getattr(p, "ds_process_group", None)
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        start = rank * size
        flat = torch.arange(start, start + size, device=p.ds_tensor.device)
        return flat < rows * p.ds_shape[1]  # rows are contiguous in the flattened (V, d) parameter

    def _global_steps(self) -> int:
        return int(getattr(self.engine, "global_steps", 0)) if self.engine is not None else 0

    # -- the two calls per step ---------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Zero the frozen gradients; call after backward and before the optimizer (engine) step."""
        if not self.active:
            return
        if self.engine is not None and not self.engine.is_gradient_accumulation_boundary():
            return  # DeepSpeed steps only at the boundary; the gradients are complete only there
        for name, rows in self.mask.items():
            p = self.params[name]
            if _zero3(p):
                from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

                g = safe_get_local_grad(p)
                if g is None:
                    continue
                local = self._local.get(name)
                g = torch.zeros_like(g) if local is None else g.masked_fill(local.to(g.device), 0.0)
                safe_set_local_grad(p, g)
            elif _ds_stage12(p):
                from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

                g = safe_get_full_grad(p)
                if g is None:
                    continue
                g = torch.zeros_like(g) if rows is None else torch.cat([torch.zeros_like(g[:rows]), g[rows:]])
                safe_set_full_grad(p, g)
            elif p.grad is not None:
                if rows is None:
                    p.grad.zero_()
                else:
                    p.grad[:rows].zero_()

    def after_step(self) -> None:
        """Write the saved values back (weight decay moves weights whose gradient is zero)."""
        if not self.active:
            return
        if self.engine is not None:
            steps = self._global_steps()
            if steps == self._steps:
                return  # no optimizer step happened since the last restore
            self._steps = steps
        with torch.no_grad():
            for name, rows in self.mask.items():
                if name not in self._saved:
                    continue
                p, saved = self.params[name], self._saved[name]
                if _zero3(p):
                    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

                    local = self._local.get(name)
                    cur = safe_get_local_fp32_param(p)
                    value = saved.to(cur.device, cur.dtype)
                    if local is not None:
                        value = torch.where(local.to(cur.device), value, cur)
                    safe_set_local_fp32_param(p, value)  # the optimizer's fp32 master slice
                    p.ds_tensor.data.copy_(value.view_as(p.ds_tensor).to(p.ds_tensor.dtype))  # the working slice
                elif _ds_stage12(p):
                    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

                    full = safe_get_full_fp32_param(p)
                    value = saved.to(full.device, full.dtype)
                    if rows is not None:
                        value = torch.cat([value, full[rows:]])
                    safe_set_full_fp32_param(p, value)
                    p.data.copy_(value.to(p.dtype))
                elif rows is None:
                    p.data.copy_(saved.to(p.device, p.dtype))
                else:
                    p.data[:rows].copy_(saved.to(p.device, p.dtype))
        # ZeRO-3 keeps small ("persistent") parameters gathered between steps, refreshed at the end of each step:
        # gather the restored slices again, or the next forward would use the stepped values.
        persistent = [self.params[n] for n in self._local if getattr(self.params[n], "ds_persist", False)]
        if persistent:
            persistent[0].partition(param_list=persistent, has_been_updated=False)  # drop the stale full copies
            persistent[0].all_gather(param_list=persistent)

    def max_drift(self) -> float:
        """Largest |current - saved| over the frozen values this rank holds (0.0 while frozen: for checks)."""
        worst = 0.0
        for name, rows in self.mask.items():
            if name not in self._saved:
                continue
            p, saved = self.params[name], self._saved[name]
            if _zero3(p):
                cur = self._get_local(p).detach().cpu()
                local = self._local.get(name)
                diff = (cur - saved).abs()
                if local is not None:
                    diff = diff[local.cpu()]
            else:
                cur = self._get_full(p).detach().cpu()
                diff = (cur if rows is None else cur[:rows]).float() - saved.float()
                diff = diff.abs()
            if diff.numel():
                worst = max(worst, float(diff.max()))
        return worst

    def release(self) -> None:
        """Stop freezing (trainer.unfreeze_at): everything trains from the next step; the saved copies are freed."""
        if self.active:
            log.info("unfreezing: every weight trains from now on")
        self.active = False
        self._saved.clear()
        self._local.clear()
