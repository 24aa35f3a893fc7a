"""Where the Hydra configuration lives, its typed schemas, and the wrapper that turns a function into a Hydra app.

Every group of conf/ is typed: `ftlm.model.GPTConfig`, `ftlm.data.config.DataConfig`, and the trainer and
DeepSpeed schemas of `ftlm/train/config.py` are registered in Hydra's ConfigStore as `<group>/schema`, which each
group's base yaml lists first in its defaults. A misspelt key or a value of the wrong type then fails when the
config is composed; `ConfigError` says which key, and the closest known one.
"""

from __future__ import annotations

import base64
import difflib
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


class ConfigError(ValueError):
    """A config that cannot work, named by its key: an unknown key, a value of the wrong type or out of range,
    settings that contradict each other or the files they point at. The apps print it as one line, not a traceback."""


def expand_path(path) -> str:
    """`~` and environment variables expanded: what a path in conf/ means (never a folder literally named `~`)."""
    return os.path.expandvars(os.path.expanduser(str(path)))


def register() -> None:
    """The schemas in Hydra's ConfigStore and the `ftlm.path` resolver (idempotent; before every composition)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from ftlm.data.config import DataConfig
    from ftlm.model import GPTConfig
    from ftlm.train.config import DeepSpeedConfig, TrainerConfig

    cs = ConfigStore.instance()
    for group, node in (
        ("model", GPTConfig),
        ("data", DataConfig),
        ("trainer", TrainerConfig),
        ("deepspeed", DeepSpeedConfig),
    ):
        cs.store(group=group, name="schema", node=node)
    if not OmegaConf.has_resolver("ftlm.path"):
        OmegaConf.register_new_resolver("ftlm.path", expand_path)


ENCODED_OVERRIDES = "--ftlm-overrides-b64="


def encode_overrides(overrides: list[str]) -> str:
    """One argument holding `overrides` as base64 (URL-safe alphabet: no character any shell treats specially).

    The deepspeed launcher's pdsh path joins the arguments into one command line that each node's shell parses
    again, so `${model.name}`, quotes, parentheses and `$` in Hydra overrides were changed or fatal there;
    launch/multi_node.sh sends this instead (`printf '%s\0' ARGS | base64 -w0 | tr '+/' '-_'` is the same).
    """
    data = "".join(f"{o}\0" for o in overrides).encode()
    return ENCODED_OVERRIDES + base64.urlsafe_b64encode(data).decode()


def decode_overrides(arg: str) -> list[str]:
    try:
        data = base64.b64decode(arg[len(ENCODED_OVERRIDES) :], altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{ENCODED_OVERRIDES[:-1]}: not base64 of NUL-terminated overrides ({e})") from None
    if data and not data.endswith("\0"):
        raise ConfigError(f"{ENCODED_OVERRIDES[:-1]}: not base64 of NUL-terminated overrides (cut short?)")
    return data.split("\0")[:-1]


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove the `--local_rank` argument that the deepspeed launcher appends; Hydra would reject it; and expand
    the overrides launch/multi_node.sh encoded (`encode_overrides`) in place.

    The value is kept in the LOCAL_RANK environment variable, where torch.distributed looks for it anyway.
    """
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(ENCODED_OVERRIDES):
            out.extend(decode_overrides(arg))
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


# Hydra flags after which the command line is not one config to compose (help, info, a sweep, shell completion).
_NOT_A_RUN = ("-h", "--help", "--hydra-help", "-i", "--info", "-m", "--multirun", "-sc", "--shell-completion")


def _overrides(argv: list[str]) -> list[str] | None:
    """The overrides of a plain run, or None when Hydra will do something else with this command line."""
    out = []
    for arg in argv:
        if arg in _NOT_A_RUN or arg.startswith("--info") or arg.startswith("--shell-completion"):
            return None
        if arg.startswith("-"):  # -c job, --config-name x, --cfg ...: Hydra's own flags take values
            return None
        out.append(arg)
    return out


def hydra_app(config_name: str = "config", refusals: tuple[type[BaseException], ...] = (), prog: str | None = None):
    """Decorator: run `fn(cfg)` as a Hydra app over CONF_DIR, tolerant of the deepspeed launcher's arguments.

    The command line is composed once before Hydra runs, so a bad key or value is one clear line on stderr
    (exit status 2) and Hydra never creates a run directory for it. A ConfigError raised later, or one of the
    app's `refusals` (the errors that mean "your input cannot work", each with a message that says what to
    change), ends the app the same way rather than as a traceback; HYDRA_FULL_ERROR=1 shows the traceback.
    `prog` names the app in those lines (the console script's name; `python -m` would say main.py).
    """
    import hydra

    def wrap(fn):
        def checked(cfg):
            try:
                check_known_keys(cfg)  # also each job of a sweep, which is composed by Hydra's launcher
                return fn(cfg)
            except (ConfigError, *refusals) as e:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                refuse(e, prog)

        @functools.wraps(fn)
        def main():
            try:
                sys.argv = strip_launcher_args(sys.argv)
            except ConfigError as e:
                refuse(e, prog)
            register()
            overrides = _overrides(sys.argv[1:])
            if overrides is not None:
                try:
                    compose(overrides, config_name)
                except ConfigError as e:
                    refuse(e, prog)
            return hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(checked)()

        return main

    return wrap


def refuse(error: BaseException, prog: str | None = None) -> None:
    """End the app with `<prog>: error: <message>` on stderr and exit status 2 (argparse's usage error)."""
    # one write, so the lines of ranks sharing the launcher's stderr never interleave
    sys.stderr.write(f"{prog or Path(sys.argv[0]).name}: error: {error}\n")
    sys.stderr.flush()
    sys.exit(2)


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """The config as the apps would see it, for tests and notebooks (no Hydra run directory); raises ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = hydra_compose(config_name=config_name, overrides=overrides or [])
        _resolve_all(cfg)
    except ConfigError:
        raise
    except Exception as e:
        raise explain(e) from e
    finally:
        GlobalHydra.instance().clear()
    return cfg


def _resolve_all(cfg) -> None:
    """Resolve every interpolation once, so a value that does not fit its type fails here rather than mid-run."""
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    check_known_keys(cfg)


def check_known_keys(node, path: str = "") -> None:
    """Refuse keys a schema does not declare. Hydra's `+key=value` adds them even to a typed group, so a
    misspelt `+trainer.max_step=3` would otherwise be accepted and ignored."""
    import dataclasses

    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        schema = OmegaConf.get_type(node)
        keys = [str(k) for k in node.keys()]
        if schema is not None and dataclasses.is_dataclass(schema):
            known = [f.name for f in dataclasses.fields(schema)]
            for key in keys:
                if key not in known:
                    raise ConfigError(unknown_key_message(f"{path}{key}", known))
        for key in node.keys():
            child = node._get_node(key)
            if child is not None and not child._is_missing() and not child._is_interpolation():
                check_known_keys(child, f"{path}{key}.")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node._iter_ex(resolve=False)):
            check_known_keys(item, f"{path}{i}.")


def unknown_key_message(key: str, known: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: -len(leaf)]
    close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    listing = f" (known keys: {', '.join(sorted(known))})" if known and not close else ""
    return f"unknown config key {key}{hint}{listing}"


def _entry_message(key: str, parent, known: list[str]) -> str | None:
    """What to write instead, where the key is an entry of a mapping with keys of its own choosing (data.sources,
    data.mix, data.clean.max_dup_ngram_frac, ...) rather than a field of a schema."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    if not isinstance(parent, DictConfig) or dataclasses.is_dataclass(OmegaConf.get_type(parent)):
        return None
    mapping, leaf = key.rsplit(".", 1)
    if leaf in known:  # there, but under an integer key (the n of an n-gram rule): a dotted path reaches strings only
        return (
            f"{key}: Hydra cannot reach the integer key {leaf} by a dotted path; write {mapping}={{{leaf}: VALUE}} "
            "(the other entries keep their values; VALUE null turns that one off)"
        )
    return (
        f"{mapping} has no entry {leaf!r}: Hydra adds entries with ++, e.g. ++{key}=VALUE, and removes them with "
        f"~, e.g. ~{mapping}.NAME (entries: {', '.join(known) if known else 'none yet'})"
    )


def explain(error: Exception) -> Exception:
    """A composition error as a ConfigError naming the key (and the closest known key when it is unknown)."""
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        ValidationError,
    )

    cause = error
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is None or not getattr(cause, "full_key", None):
        lines = [line for line in str(error).splitlines() if "HYDRA_FULL_ERROR" not in line]
        return ConfigError("\n".join(lines).strip() or type(error).__name__)
    key = cause.full_key
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        parent = cause.parent_node
        known = [str(k) for k in parent.keys()] if parent is not None and hasattr(parent, "keys") else []
        return ConfigError(_entry_message(key, parent, known) or unknown_key_message(key, known))
    if isinstance(cause, MissingMandatoryValue):
        return ConfigError(f"{key} has no value: set it in conf/ or on the command line")
    if isinstance(cause, ValidationError):
        msg = str(cause).split("\n")[0]
        return ConfigError(f"{key}: {msg}")
    return ConfigError(f"{key}: {str(cause).splitlines()[0]}")
