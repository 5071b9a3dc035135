"""
config.py -- the bottom layer every script imports (it imports no other file of the project): config dataclasses
to and from command-line flags and saved dicts, checkpoint and JSON files written atomically and read with
weights_only=True, the one-run-per-folder lock, optional packages, and the entry points' error handling.

Layering, imports one way only (each file imports only from files above it in this list):
  config.py   this file
  data.py     synthetic shapes, image folders, the attribute checker, grids, Frechet distance
  md.py       3: the MobileDiffusion UNet and text encoder, presets, Table 1 cost
  vae.py      3.5: the VAE and the light decoder
  pretrained.py  a local diffusers Stable Diffusion 1.x folder as this project's UNet, VAE and CLIP
  plugins.py  4.3 + 5.4: LoRA, the T2I-Adapter, edge maps, inpainting
  sample.py   schedule, samplers, loading checkpoints, Pipeline
  ufogen.py   4: UFOGen's losses and the 8-step distillation target
  evaluate.py 5.1: metrics;  export_coreml.py: 5.2 / Table 4 export and latency
  train_utils.py  the plumbing under the training loops (devices, checkpoints, data stream, metrics)
  train.py    every training stage
  report.py   the paper's tables at toy scale (Tables 1, 2, 4, 5, 5.4, 5.2's guidance curve)
"""

import argparse
import dataclasses
import errno
import importlib
import json
import math
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager

import torch
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------
# Configs <-> flags and saved dicts
# ----------------------------------------------------------------------------------------------------

def _parse_value(field: dataclasses.Field, text: str):
    """Turn a flag string into the field's type: tuples as comma lists ('320,640,1024'), bools as true/false."""
    default = field.default
    if isinstance(default, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise argparse.ArgumentTypeError(f"--{field.name}: expected true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, tuple):
        kind = type(default[0])
        items = [s.strip() for s in text.split(",") if s.strip()]
        if kind is bool:
            return tuple(s.lower() in ("1", "true", "yes") for s in items)
        return tuple(kind(s) for s in items)
    return type(default)(text)


def add_config_flags(parser: argparse.ArgumentParser, cls, prefix: str = "", shown=None, note: str = "",
                     choices: dict | None = None, helps: dict | None = None) -> None:
    """One --flag per dataclass field (default None = 'keep the preset's value'). `shown`: the config instance
    whose values --help prints as the defaults (with `note`, e.g. "tiny preset"); `choices`: allowed values
    per field (argparse refuses others); `helps`: help text per field where the value alone would mislead."""
    choices, helps = choices or {}, helps or {}
    for f in dataclasses.fields(cls):
        if f.name in helps:
            text = helps[f.name]
        elif shown is not None:
            v = getattr(shown, f.name)
            v = ",".join(str(x) for x in v) if isinstance(v, tuple) else repr(v) if v == "" else v
            text = f"default: {v}{' (' + note + ')' if note else ''}"
        else:
            text = "default: the preset's"
        parser.add_argument(f"--{prefix}{f.name}", default=None, metavar=type(f.default).__name__.upper(),
                            choices=choices.get(f.name), type=lambda s, f=f: _parse_value(f, s),
                            help=f"{cls.__name__}.{f.name}; {text}")


def given_flags(cls, args: argparse.Namespace, prefix: str = "") -> dict:
    """{field: value} for the flags of dataclass `cls` the user gave (argparse leaves the others None)."""
    return {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
            if getattr(args, prefix + f.name, None) is not None}


def config_from_args(base, args: argparse.Namespace, prefix: str = ""):
    """The preset `base` with every flag the user gave applied on top."""
    return dataclasses.replace(base, **given_flags(type(base), args, prefix))


def read_json(path: str) -> dict:
    """A JSON object from a file; a missing, unreadable or non-object file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def load_safetensors(path: str, metadata: bool = False):
    """A .safetensors file's tensors (the optional package `safetensors`; memory-mapped: a tensor is read when
    used), a damaged file named in the error; with metadata, (tensors, the header's string metadata)."""
    safetensors, torch_io = need("safetensors", "safetensors"), need("safetensors.torch", "safetensors")
    try:
        tensors = torch_io.load_file(path)
        if not metadata:
            return tensors
        with safetensors.safe_open(path, "pt") as f:
            return tensors, f.metadata() or {}
    except Exception as e:                                       # safetensors' own error types vary by version
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_diffusers_config(folder: str, sub: str, what: str, name: str = "config.json") -> tuple[str, dict]:
    """(the model's folder, its config.json) for a diffusers model folder, or a pipeline folder holding it as
    `sub`/ (save_pretrained's layout); a missing or malformed config file is an error naming the file."""
    folder = os.path.join(folder, sub) if os.path.isdir(os.path.join(folder, sub)) else folder
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {name} (expected a diffusers {what} folder)")
    return folder, read_json(path)


def config_from_dict(cls, d: dict):
    """A config dataclass from its saved dict (lists back to tuples; fields a newer version dropped ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------------
# Files: checkpoints and JSON written atomically, one run per folder
# ----------------------------------------------------------------------------------------------------

class Diverged(FloatingPointError):
    """A non-finite loss, gradient norm or weight. The stage stops before the update or the write that would
    carry it, so the last checkpoint on disk stays the last good one; entry points exit with status 2."""


def diverged(stage: str, out_dir: str, what: str, value, step: int) -> Diverged:
    """The error that stops a stage, naming the checkpoints it leaves: the last one written (finite, but written
    while the loss may already have been rising) and, when there is one, the one before it (previous_path)."""
    path = os.path.join(out_dir, f"{stage}.pt")
    kept = (f"the last good checkpoint {path} is kept as it was (step {checkpoint_step(path)})"
            if os.path.isfile(path) else "no checkpoint of this stage was written")
    prev = previous_path(path)
    if os.path.isfile(prev):
        kept += f", and the one before it, {prev} (step {checkpoint_step(prev)})"
    return Diverged(f"{stage}: non-finite {what} ({value}) at step {step}; stopped before using it, {kept}. "
                    f"Lower --lr, or check the data")


def previous_path(path: str) -> str:
    """Where save_checkpoint(keep_previous=True) keeps the checkpoint it replaced: stage.pt -> stage.prev.pt."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def checkpoint_step(path: str):
    """The step a checkpoint was written at ('?' if it cannot be read)."""
    try:
        return load_checkpoint(path).get("step", "?")
    except (ValueError, FileNotFoundError):
        return "?"


def non_finite(obj, key: str = "") -> str | None:
    """The key of the first floating-point tensor in a (nested) payload holding NaN or inf, else None."""
    if torch.is_tensor(obj):
        return key if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = non_finite(v, f"{key}.{k}" if key else str(k))
        if bad is not None:
            return bad
    return None


WRITE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder); the message says what was kept."""


def refuse_non_finite(obj: dict, path: str, key: str = "") -> dict:
    """obj (a loaded checkpoint, or a part of it under `key`), refused if any tensor holds NaN/inf: such weights
    sample black images, and a resumed run would go on from garbage."""
    bad = non_finite(obj, key)
    if bad is not None:
        raise ValueError(f"{path}: {bad} holds NaN/inf values; not a usable checkpoint (an earlier one, e.g. "
                         f"{previous_path(path)}, may be)")
    return obj


def save_checkpoint(path: str, payload: dict, keep_previous: bool = False, write=None) -> None:
    """Atomic: write to a temporary file of this process, then rename over the old one, so a crash mid-write
    (or a second run writing the same path) never leaves a half-written checkpoint in place of the last good
    one. Refuses a payload with non-finite weights: the old file is kept. keep_previous (the training stages):
    the file it replaces becomes previous_path(path), so that the checkpoint from before a divergence, or from
    before an --overwrite run's first save, is still on disk (a hard link: no copy, and no moment without
    `path`). write(payload, file): torch.save (None), or a safetensors writer (sample.save_weights)."""
    bad = non_finite(payload)
    if bad is not None:
        raise Diverged(f"{path}: not written, {bad} holds NaN/inf values; the previous file (if any) is kept")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp, prev_tmp = f"{path}.{os.getpid()}.tmp", f"{previous_path(path)}.{os.getpid()}.tmp"
    try:
        try:
            (write or torch.save)(payload, tmp)
        except (RuntimeError, OSError) as e:                     # a full disk: torch's "unexpected pos ..."
            folder = os.path.dirname(os.path.abspath(path))
            free = shutil.disk_usage(folder).free / 2 ** 30 if os.path.isdir(folder) else float("nan")
            kept = f"the previous {path} is intact" if os.path.isfile(path) else "no earlier checkpoint existed"
            raise CheckpointWriteError(f"{path}: could not be written ({type(e).__name__}: {str(e)[:120]}; "
                                       f"{free:.1f} GiB free in {folder}, not writable or full?); {kept}") from None
        if keep_previous and os.path.isfile(path):
            try:
                os.link(path, prev_tmp)
            except OSError:                                      # a filesystem without hard links
                shutil.copy2(path, prev_tmp)
            os.replace(prev_tmp, previous_path(path))
        os.replace(tmp, path)
    finally:
        for t in (tmp, prev_tmp):
            if os.path.exists(t):
                os.remove(t)


def load_checkpoint(path: str) -> dict:
    """A checkpoint, weights only (no pickled code runs), memory-mapped: a tensor is read from disk when it is
    used, so loading a sampler's EMA weights from a ufogen.pt never reads its discriminator and optimisers."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} could not be read as a weights-only torch file: {e}") from e


def config_mismatch(saved: dict, current, ignore: tuple = ()) -> list[str]:
    """Fields whose values differ between a saved config dict and a current dataclass. A field the saved dict
    lacks (it was written before the field existed) counts as having the field's default."""
    now = dataclasses.asdict(current)
    defaults = {f.name: f.default for f in dataclasses.fields(current) if f.default is not dataclasses.MISSING}
    out = []
    for k in sorted(set(saved) | set(now)):
        if k in ignore:
            continue
        a, b = saved.get(k, defaults.get(k, "<absent>")), now.get(k, "<absent>")
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{k}: checkpoint {a!r} vs now {b!r}")
    return out


def refuse_if_mismatch(path: str, what: str, saved: dict, current, ignore: tuple = ()) -> None:
    diff = config_mismatch(saved, current, ignore)
    if diff:
        raise ValueError(f"{path}: the checkpoint's {what} config differs from this run's in "
                         f"{len(diff)} field(s): " + "; ".join(diff))


class Log:
    """metrics.jsonl (one JSON object per logged step) + a tqdm bar; rank 0 only. out_dir None (train.py
    --bench): no file is read or written. `times`: the wall-clock time of each step() call, the step times
    of the benchmark (a step's metrics are floats by then, so an accelerator has finished it)."""

    def __init__(self, out_dir: str | None, stage: str, steps: int, start: int, rank: int):
        self.rank, self.stage = rank, stage
        self.path = os.path.join(out_dir or ".", "metrics.jsonl")
        self.times = [time.perf_counter()]
        if out_dir is None:
            self.rank = -1                                         # as a rank that writes nothing
        if self.rank == 0 and os.path.isfile(self.path):
            self.drop_rows_after(start)
        self.bar = tqdm(total=steps, initial=start, desc=stage, disable=rank != 0, dynamic_ncols=True)

    def drop_rows_after(self, start: int) -> None:
        """This stage's rows past `start` (a resumed run redoes those steps; a fresh one, start 0, redoes all),
        so that metrics.jsonl holds each step once. Other stages' rows are kept."""
        with open(self.path) as f:
            lines = f.readlines()
        keep = [ln for ln in lines if not ln.strip() or not self._redone(ln, start)]
        if len(keep) < len(lines):
            write_text(self.path, "".join(keep))

    def _redone(self, line: str, start: int) -> bool:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False
        return row.get("stage") == self.stage and row.get("step", 0) > start

    def step(self, step: int, metrics: dict, write: bool):
        metrics = {k: v for k, v in metrics.items() if v is not None}     # (no grad_norm of a skipped step)
        for k, v in metrics.items():                           # every step, logged or not: stop at the first NaN
            if isinstance(v, float) and not math.isfinite(v):
                raise diverged(self.stage, os.path.dirname(self.path), k, v, step)
        self.times.append(time.perf_counter())
        self.bar.update(1)
        if self.rank == 0 and write:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)})
            with open(self.path, "a") as f:
                f.write(json.dumps({"stage": self.stage, "step": step, **metrics}, allow_nan=False) + "\n")

    def record(self, step: int, metrics: dict):
        """A row outside the per-step log (a validation loss): written by rank 0, refused if non-finite."""
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise diverged(self.stage, os.path.dirname(self.path), k, v, step)
        if self.rank == 0:
            self.bar.write(f"{self.stage} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            with open(self.path, "a") as f:
                f.write(json.dumps({"stage": self.stage, "step": step, **metrics}, allow_nan=False) + "\n")

    def close(self):
        self.bar.close()


def write_text(path: str, text: str) -> None:
    """Atomic, through a temp file of this process: two writers never share a temp file, and a reader never
    sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2))


@contextmanager
def out_dir_lock(out_dir: str, rank: int):
    """One run per out_dir: two runs would interleave metrics.jsonl and overwrite each other's checkpoints.
    Rank 0 holds out_dir/run.lock (host and pid) for the run's duration; a lock left by a dead process of this
    host is taken over, any other is refused with its owner named."""
    if rank != 0:
        yield
        return
    path, me = os.path.join(out_dir, "run.lock"), f"{socket.gethostname()} {os.getpid()}"
    for attempt in (0, 1):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = open(path).read().strip()
            host, _, pid = owner.partition(" ")
            if attempt == 0 and host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                os.remove(path)                                   # stale: its run died without cleaning up
                continue
            raise ValueError(f"{out_dir} is in use by another run (host {host}, pid {pid}; lock file {path}): wait for "
                             f"it, give another --out_dir, or delete {path} if that run is gone") from None
    os.write(fd, me.encode())
    os.close(fd)
    remove_stale_temp_files(out_dir)
    try:
        yield
    finally:
        os.remove(path)


def remove_stale_temp_files(out_dir: str) -> list[str]:
    """Delete the <file>.<pid>.tmp files that a process of this host killed mid-write left in out_dir (the run
    holding the folder's lock owns it; a live process's temp file is kept). Returns the removed names."""
    removed = []
    for name in os.listdir(out_dir):
        stem, _, ext = name.rpartition(".")
        pid = stem.rpartition(".")[2]
        if ext == "tmp" and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    if removed:
        print(f"{out_dir}: removed {len(removed)} temp file(s) left by killed runs ({', '.join(removed[:3])})")
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------

def need(package: str, pip_name: str):
    """Import an optional package or stop with a message naming it (not a traceback)."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise SystemExit(f"this needs the optional package {pip_name!r}: pip install {pip_name}") from None


def run_cli(main) -> None:
    """Every script's entry point: bad input (ValueError, FileNotFoundError), a diverged run (FloatingPointError,
    Diverged), a checkpoint that cannot be written (CheckpointWriteError) and a read-only, full or forbidden
    folder (OSError with one of WRITE_ERRNOS) end as one 'error: ...' line on stderr and exit status 2, as
    argparse's own errors do, not a traceback. main() itself still raises, for callers and tests."""
    def fail(message: str):
        for bar in list(getattr(tqdm, "_instances", ())):       # close open progress bars first, so that the
            bar.close()                                          # error is the last line, not a redrawn bar
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except (ValueError, FloatingPointError, FileNotFoundError, CheckpointWriteError) as e:
        fail(str(e))
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        fail(f"{e}; the files already there are as they were (every write is a temporary file, then a rename)")
