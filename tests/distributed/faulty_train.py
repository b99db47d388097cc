"""`visprune train` with faults injected, for the subprocess tests (never imported by visprune itself).

VISPRUNE_TEST_KILL_AT=N      SIGKILL this process at the end of optimizer step N
VISPRUNE_TEST_KILL_IN_SAVE=N SIGKILL this process half-way through writing checkpoint-N (model files written,
                             optimizer state not yet)
VISPRUNE_TEST_NAN_AT=N,M     the LM loss of optimizer steps N, M is NaN (on rank 0 only)
"""

import os
import signal
import sys

from transformers import TrainerCallback
from visprune.trainer import cli
from visprune.trainer.trainer import VispruneTrainer


def _steps(name):
    return {int(x) for x in os.environ.get(name, "").split(",") if x}


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    kill_at, kill_in_save, nan_at = _steps("VISPRUNE_TEST_KILL_AT"), _steps("VISPRUNE_TEST_KILL_IN_SAVE"), \
        _steps("VISPRUNE_TEST_NAN_AT")
    init = VispruneTrainer.__init__

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for step in kill_at:
            self.add_callback(KillAt(step))
        if nan_at and int(os.environ.get("RANK", "0")) == 0:
            def hook(module, hook_args, hook_kwargs, output):
                if self.state.global_step + 1 in nan_at and getattr(output, "loss", None) is not None:
                    output.loss = output.loss * float("nan")
                return output

            self.model.register_forward_hook(hook, with_kwargs=True)

    VispruneTrainer.__init__ = patched_init
    save = VispruneTrainer._save_optimizer_and_scheduler

    def patched_save(self, output_dir):
        if self.state.global_step in kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, output_dir)

    VispruneTrainer._save_optimizer_and_scheduler = patched_save
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
