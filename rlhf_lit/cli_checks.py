"""Checks of the command line that run before any work: the ``--config`` files parse (an error
names the file, line and column), and a checkpoint asked for by ``--ckpt_path last`` exists.

jsonargparse reports a YAML syntax error with a line but without the file (``in "<unicode
string>", line 3``), and Lightning answers ``test --ckpt_path last`` in a folder without a
checkpoint with a warning, then evaluates the SFT adapter against itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from rlhf_lit.errors import InputFileError, MissingPathError

CONFIG_FLAGS = ("--config", "-c")


def config_paths(argv: list[str]) -> list[str]:
    """The files named by ``--config X``, ``--config=X`` and ``-c X``, in order."""
    out = []
    for i, a in enumerate(argv):
        for flag in CONFIG_FLAGS:
            if a == flag and i + 1 < len(argv):
                out.append(argv[i + 1])
            elif a.startswith(flag + "="):
                out.append(a[len(flag) + 1:])
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def _no_duplicate_keys_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """A safe loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if key in seen:
                    raise _DuplicateKey(str(key), key_node.start_mark.line + 1, seen[key])
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return Loader


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file exists, is UTF-8 text, parses as YAML and gives no key twice in one
    mapping.

    Raises:
        MissingPathError: a config file that does not exist.
        InputFileError: naming ``file:line:column`` of a YAML syntax error or of bytes that are not
            UTF-8, or ``file:line`` of a key given twice.
    """
    import yaml

    _NoDuplicateKeys = _no_duplicate_keys_loader()

    for name in config_paths(argv):
        path = Path(name).expanduser()
        if not path.is_file():
            raise MissingPathError(f"--config {name}: no such file")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise InputFileError(f"{name}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the config as "
                                 f"UTF-8") from None
        try:
            yaml.load(text, Loader=_NoDuplicateKeys)
        except _DuplicateKey as e:
            raise InputFileError(f"{name}:{e.line}: the key {e.key!r} appears twice in one mapping (first at line "
                                 f"{e.first}); YAML keeps only the last, so the first block would be ignored: merge "
                                 f"them") from None
        except yaml.YAMLError as e:
            mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
            msg = f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}"
            if getattr(e, "context", None) and context is not None:
                msg += f" ({e.context} that starts at line {context.line + 1}, column {context.column + 1})"
            raise InputFileError(msg) from None


def check_checkpoint_exists(ckpt_path: Optional[str], checkpoint_dirs: Iterable[Optional[str]], subcommand: str) -> None:
    """``--ckpt_path last`` must find ``last.ckpt`` in a checkpoint folder; a file path must exist.

    Raises:
        MissingPathError: naming ``--ckpt_path``, the folders looked in and what to do instead.
    """
    if ckpt_path is None:
        return
    if ckpt_path == "last":
        dirs = [Path(d) for d in checkpoint_dirs if d]
        if not any((d / "last.ckpt").is_file() for d in dirs):
            looked = ", ".join(str(d) for d in dirs) or "no checkpoint folder is configured"
            raise MissingPathError(
                f"{subcommand} --ckpt_path last: there is no last.ckpt ({looked}). Check "
                f"--trainer.logger.init_args.save_dir (the run folder), give a checkpoint file, or leave "
                f"--ckpt_path out to {subcommand} the adapters as configured"
            )
    elif ckpt_path not in ("best", "hpc", "registry") and not Path(ckpt_path).expanduser().is_file():
        raise MissingPathError(f"{subcommand} --ckpt_path {ckpt_path}: no such file")
