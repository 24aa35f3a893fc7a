"""`ftlm.train.main` with test hooks, run as a script (by python or the deepspeed launcher) from test_resume.py.

FTLM_TEST_KILL_AT_SEAL=<step>       SIGKILL this process when the save of <step> has written every shard but
                                    not yet its manifest: the middle of a save, with no timing to race
FTLM_TEST_SAVE_AFTER_LOAD=<folder>  right after a checkpoint is loaded, save the engine's state as DeepSpeed
                                    sees it to <folder>/after_load, so a test can compare it with the source
FTLM_TEST_NAN_FROM=<n>              from the n-th training forward pass on (1-based), the loss is NaN: a run that
                                    diverges
"""

import os
import runpy
import signal

from ftlm.train import checkpoint

kill_at = os.environ.get("FTLM_TEST_KILL_AT_SEAL")
if kill_at:
    seal = checkpoint._seal

    def _seal_or_die(tmp, step, *args, **kwargs):
        if step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        seal(tmp, step, *args, **kwargs)

    checkpoint._seal = _seal_or_die

save_after_load = os.environ.get("FTLM_TEST_SAVE_AFTER_LOAD")
if save_after_load:
    load = checkpoint.load

    def _load_then_save(engine, ckpt, rank, world_size):
        loaded = load(engine, ckpt, rank, world_size)
        engine.save_checkpoint(save_after_load, tag="after_load", save_latest=False)
        return loaded

    checkpoint.load = _load_then_save

nan_from = os.environ.get("FTLM_TEST_NAN_FROM")
if nan_from:
    from ftlm.model.gpt import GPT

    forward, calls = GPT.forward, [0]

    def _diverging_forward(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if self.training and loss is not None:
            calls[0] += 1
            if calls[0] >= int(nan_from):
                loss = loss * float("nan")
        return logits, loss

    GPT.forward = _diverging_forward

runpy.run_module("ftlm.train.main", run_name="__main__", alter_sys=True)
