"""Where the Hydra configuration lives, and the wrapper that turns a function into a Hydra app."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

# A source checkout (and an editable install) reads conf/ at the project root; a wheel ships it as ftlm/conf
# (in a checkout, ftlm/conf is a link to conf/).
_ROOT_CONF = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = Path(
    os.environ.get("FTLM_CONF_DIR") or (_ROOT_CONF if _ROOT_CONF.is_dir() else Path(__file__).parent / "conf")
)


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove the `--local_rank` argument that the deepspeed launcher appends; Hydra would reject it.

    The value is kept in the LOCAL_RANK environment variable, where torch.distributed looks for it anyway.
    """
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def hydra_app(config_name: str = "config"):
    """Decorator: run `fn(cfg)` as a Hydra app over CONF_DIR, tolerant of the deepspeed launcher's arguments."""
    import hydra

    def wrap(fn):
        @functools.wraps(fn)
        def main():
            sys.argv = strip_launcher_args(sys.argv)
            return hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(fn)()

        return main

    return wrap


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """The resolved config as the apps would see it, for tests and notebooks (no Hydra run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
