"""Training and evaluation never lose or misreport work: a diverged run stops and keeps its last good
checkpoint, --resume and re-runs refuse what would mix or overwrite runs, one run per out_dir, and every
entry point turns bad input into one 'error: ...' line (exit status 2) before doing any work."""

import json
import os
import subprocess
import sys

import pytest
import torch

import config
import evaluate as ev
import export_coreml
import report
import sample as S
import train
import vae as vae_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--batch_size", "4", "--sample_every", "0", "--eval_images", "4", "--warmup", "0", "--log_every", "1"]


def strict_json_rows(path):
    """metrics.jsonl parsed as strict JSON: NaN / Infinity are not JSON and fail here."""
    def refuse(c):
        raise ValueError(f"{path}: non-JSON constant {c}")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def run_script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


# --- 1. a non-finite loss stops the run; nothing bad is written --------------------------------------

@pytest.mark.slow
def test_a_diverging_run_stops_with_one_error_line_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    r = run_script("train.py", "--stage", "vae", "--steps", "20", "--lr", "1e6", "--ckpt_every", "1",
                   "--out_dir", str(out), *COMMON)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1].split("\r")[-1]          # (tqdm redraws its bar with \r)
    assert last.startswith("error: vae: non-finite ") and "stopped before using it" in last
    assert f"the last good checkpoint {out / 'vae.pt'} is kept" in last and "Traceback" not in r.stderr
    ck = config.load_checkpoint(str(out / "vae.pt"))
    assert 1 <= ck["step"] < 20 and config.non_finite(ck) is None      # written before the blow-up, all finite
    rows = strict_json_rows(out / "metrics.jsonl")
    assert rows and rows[-1]["step"] <= ck["step"] + 1
    assert not (out / "run.lock").exists()                            # the lock is released on the way out


def test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "x.pt")
    config.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})
    before = open(path, "rb").read()
    with pytest.raises(config.Diverged, match=r"x.pt: not written, model.w holds NaN/inf"):
        config.save_checkpoint(path, {"model": {"w": torch.tensor([1.0, float("inf"), 0.0])}, "step": 2})
    assert open(path, "rb").read() == before
    seen = []                                                         # the temp file is this process's own
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (seen.append(str(f)), real_save(obj, f)))
    config.save_checkpoint(path, {"step": 3})
    assert str(os.getpid()) in seen[0] and os.listdir(tmp_path) == ["x.pt"]


def test_log_refuses_a_nan_metric_before_writing_it(tmp_path):
    log = config.Log(str(tmp_path), "diffusion", 5, 0, 0)
    log.step(1, {"loss": 0.5}, write=True)
    with pytest.raises(config.Diverged, match=r"diffusion: non-finite loss \(nan\) at step 2"):
        log.step(2, {"loss": float("nan")}, write=True)
    log.close()
    assert [r["step"] for r in strict_json_rows(tmp_path / "metrics.jsonl")] == [1]


# --- 3, 4. --resume continues only the same run; a finished stage is not overwritten silently -----------

@pytest.mark.slow
def test_resume_refuses_changed_fields_and_rerun_refuses_to_overwrite(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--stage", "vae", "--steps", "2", "--out_dir", out, *COMMON]
    train.main(args)
    path = os.path.join(out, "vae.pt")
    before, log_before = open(path, "rb").read(), open(os.path.join(out, "metrics.jsonl")).read()
    with pytest.raises(ValueError, match=r"vae.pt exists: give --resume to continue it, or --overwrite"):
        train.main(args)
    for flag, value, named in [("--seed", "1", "seed: checkpoint 0 vs now 1"),
                               ("--batch_size", "8", "batch_size: checkpoint 4 vs now 8"),
                               ("--lr", "0.01", "lr: checkpoint 0.001 vs now 0.01"),
                               ("--resolution", "64", "resolution: checkpoint 32 vs now 64")]:
        with pytest.raises(ValueError, match=named):
            train.main([*args, "--resume", "true", flag, value])
    assert open(path, "rb").read() == before                          # nothing lost, nothing rewritten
    assert open(os.path.join(out, "metrics.jsonl")).read() == log_before
    train.main([*args[:3], "3", *args[4:], "--resume", "true"])      # --steps may change: one more step
    assert config.load_checkpoint(path)["step"] == 3
    train.main([*args, "--overwrite", "true"])                        # explicit: trained again from scratch
    assert config.load_checkpoint(path)["step"] == 2
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--resume", "true", "--overwrite", "true"])
    assert e.value.code == 2 and "contradict" in capsys.readouterr().err


def test_stage_all_refuses_before_any_work_when_a_later_stage_exists(tmp_path):
    out = tmp_path / "all"
    out.mkdir()
    (out / "diffusion.pt").write_bytes(b"finished elsewhere")
    with pytest.raises(ValueError, match="diffusion.pt exists"):
        train.main(["--out_dir", str(out), *COMMON])
    assert sorted(os.listdir(out)) == ["diffusion.pt"]               # no vae.pt trained first


# --- 5. one run per out_dir -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_in_the_same_out_dir_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import socket
    out = tmp_path / "locked"
    out.mkdir()
    (out / "run.lock").write_text("other-host 12345")
    with pytest.raises(ValueError, match=r"in use by another run \(host other-host, pid 12345; lock file"):
        train.main(["--stage", "vae", "--steps", "1", "--out_dir", str(out), *COMMON])
    assert not (out / "vae.pt").exists() and (out / "run.lock").read_text() == "other-host 12345"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "run.lock").write_text(f"{socket.gethostname()} {dead.pid}")   # this host, process gone: stale
    train.main(["--stage", "vae", "--steps", "1", "--out_dir", str(out), *COMMON])
    assert (out / "vae.pt").exists() and not (out / "run.lock").exists()


# --- 6. command-line validation: argparse's message, exit status 2, before any work -----------------

@pytest.mark.parametrize("argv, named", [
    (["--steps", "0"], "--steps 0: expected > 0"),
    (["--steps", "-5"], "--steps -5: expected > 0"),
    (["--resolution", "0"], "--resolution 0: expected a positive multiple of 8"),
    (["--grad_accum", "0"], "--grad_accum 0: expected >= 1"),
    (["--log_every", "0"], "--log_every 0: expected >= 1"),
    (["--ckpt_every", "0"], "--ckpt_every 0: expected >= 1"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--lr_schedule", "linear"], "argument --lr_schedule: invalid choice: 'linear'"),
    (["--seed", str(2 ** 40)], "--seed 1099511627776: expected 0 <= seed < 2^32"),
    (["--stage", "foo"], "argument --stage: invalid choice: 'foo'"),
    (["--preset", "huge"], "--preset 'huge': expected one of"),
    (["--lr", "nan"], "--lr nan: expected a finite number"),
    (["--guidance", "inf"], "--guidance inf: expected a finite number"),
    (["--shuffle_buffer", "0"], "--shuffle_buffer 0: expected >= 1"),
    (["--prompts", "/no/such/prompts.txt"], "--prompts /no/such/prompts.txt: no such file"),
])
def test_train_flags_are_validated(argv, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--out_dir", str(tmp_path / "x")])
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_help_shows_real_defaults(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps INT TrainConfig.steps; default: the stage's (vae 1800, decoder 800, diffusion 600" in text
    assert "--resolution INT TrainConfig.resolution; default: 32" in text
    assert "--channels TUPLE UNetConfig.channels; default: 32,64,128 (tiny preset)" in text


@pytest.mark.parametrize("argv, named", [
    (["--n", "0"], "--n 0: expected >= 1"),
    (["--seed", str(2 ** 70)], "expected 0 <= seed < 2^32"),
    (["--out", "grid.xyz"], "--out grid.xyz: unknown image extension '.xyz'"),
    (["--out", "/no/such/folder/grid.png"], "folder /no/such/folder does not exist"),
    (["--steps", "0"], "--steps 0: expected >= 1"),
    (["--strength", "0"], "--strength 0.0: expected 0 < strength <= 1"),
])
def test_sample_flags_are_refused_before_loading_or_sampling(argv, named, capsys):
    # the checkpoint does not exist: reaching it would raise FileNotFoundError instead of argparse's exit
    with pytest.raises(SystemExit) as e:
        S.main(["--ckpt", "missing.pt", "--prompt", "x", *argv])
    assert e.value.code == 2 and named in capsys.readouterr().err


def test_non_image_inputs_are_named(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"--init .*notes.png: not a readable image"):
        S.read_image(str(tmp_path / "notes.png"), "--init", 64, "rgb")
    with pytest.raises(FileNotFoundError, match=r"--mask .*nope.png: no such file"):
        S.read_image(str(tmp_path / "nope.png"), "--mask", 64, "gray")


@pytest.mark.parametrize("main, argv, named", [
    (ev.main, ["--ckpt", "x.pt", "--batch", "0"], "--batch 0 / --n 0: expected --batch >= 1"),
    (ev.main, ["--ckpt", "x.pt", "--n", "-1"], "--n -1: expected --batch >= 1 and --n >= 0"),
    (vae_lib.main, ["--presets", "foo"], "--presets 'foo': unknown 'foo'; expected names from"),
    (report.main, ["--plugins", "--onestep", "foo"], "--onestep 'foo': expected NAME=CKPT"),
    (report.main, ["--table5", "--steps", "0"], "--steps 0: expected >= 1"),
    (report.main, ["--ablations", "--seeds", "0"], "--seeds 0: expected >= 1"),
    (report.main, ["--ablations", "--rows", "0,99"], "--rows 0,99: expected indices 0..8 of report.ABLATIONS"),
    (export_coreml.main, ["--preset", "tiny", "--components", "bogus,unett"], "unknown 'bogus', 'unett'"),
    (export_coreml.main, ["--preset", "tiny", "--resolution", "0"], "--resolution 0: expected >= 1"),
    (export_coreml.main, ["--preset", "tiny", "--unet_batch", "0"], "--unet_batch 0: expected >= 1"),
    (export_coreml.main, ["--preset", "tiny", "--threads", "0"], "--threads 0: expected >= 1"),
    (export_coreml.main, ["--preset", "tiny", "--repeats", "0"], "--repeats 0: expected >= 1"),
])
def test_other_entry_points_validate_their_flags(main, argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.slow
def test_entry_points_turn_errors_into_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for argv, named in [(["sample.py", "--ckpt", str(tmp_path / "missing.pt"), "--prompt", "x"], "does not exist"),
                        (["evaluate.py", "--ckpt", str(tmp_path / "missing.pt")], "no such file"),
                        (["report.py", "--table5", "--run_dir", str(tmp_path)], "diffusion.pt: no such file"),
                        (["report.py", "--plugins", "--run_dir", str(tmp_path)], "missing; make it with")]:
        r = run_script(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
        assert named in r.stderr and "Traceback" not in r.stderr


def test_a_run_removes_temp_files_of_killed_writers_and_a_resume_logs_each_step_once(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = out / "vae.pt.999999999.tmp"                                # pid 999999999: no such process
    dead.write_bytes(b"half a checkpoint")
    alive = out / f"vae.pt.{os.getppid()}.tmp"                        # a live process's (our parent's): kept
    alive.write_bytes(b"being written")
    common = ["--stage", "vae", "--batch_size", "2", "--out_dir", str(out), "--sample_every", "0",
              "--eval_images", "2", "--warmup", "1", "--log_every", "1", "--ckpt_every", "2"]
    train.main([*common, "--steps", "3"])
    assert not dead.exists() and alive.exists()
    train.main([*common, "--steps", "4", "--resume", "true"])           # resumes at its step-3 checkpoint
    rows = [r["step"] for r in strict_json_rows(out / "metrics.jsonl") if r["stage"] == "vae" and "loss" in r]
    assert rows == [1, 2, 3, 4]
    (out / "vae.pt").unlink()
    train.main([*common, "--steps", "2", "--resume", "true"])           # no checkpoint: redone from step 0
    rows = [r["step"] for r in strict_json_rows(out / "metrics.jsonl") if r["stage"] == "vae" and "loss" in r]
    assert rows == [1, 2]


def test_the_checkpoint_before_the_last_is_kept_and_named_and_nan_weights_are_refused_at_load(tmp_path):
    out = tmp_path / "run"
    common = ["--stage", "vae", "--batch_size", "2", "--out_dir", str(out), "--sample_every", "0",
              "--eval_images", "2", "--warmup", "1", "--log_every", "1", "--ckpt_every", "1"]
    train.main([*common, "--steps", "3"])
    assert config.load_checkpoint(str(out / "vae.pt"))["step"] == 3
    assert config.load_checkpoint(str(out / "vae.prev.pt"))["step"] == 2        # the one it replaced
    msg = str(config.diverged("vae", str(out), "loss", float("nan"), 4))
    assert f"{out / 'vae.pt'} is kept as it was (step 3)" in msg
    assert f"the one before it, {out / 'vae.prev.pt'} (step 2)" in msg
    ck = config.load_checkpoint(str(out / "vae.pt"))
    state = {k: v.clone() for k, v in ck["model"].items()}
    state["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    torch.save({**ck, "model": state}, out / "nan.pt")                   # written around save_checkpoint's guard
    with pytest.raises(ValueError, match=r"nan.pt: model.decoder.conv_out.weight holds NaN/inf"):
        S.load_vae(str(out / "nan.pt"))
    os.replace(out / "nan.pt", out / "vae.pt")                           # ... and a --resume from it
    with pytest.raises(ValueError, match=r"vae.pt: model.decoder.conv_out.weight holds NaN/inf .*vae.prev.pt"):
        train.main([*common, "--steps", "5", "--resume", "true"])
    os.replace(out / "vae.prev.pt", out / "vae.pt")
    before = (out / "vae.pt").read_bytes()                               # --overwrite keeps the old good one
    train.main([*common, "--steps", "1", "--overwrite", "true"])
    assert (out / "vae.prev.pt").read_bytes() == before


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """torch.save on a full disk fails with "[enforce fail at inline_container.cc:672] . unexpected pos"; the
    user gets one line that names the file and says the previous checkpoint is intact, which it is."""
    path = str(tmp_path / "diffusion.pt")
    config.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = open(path, "rb").read()

    def full_disk(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 13918457152 vs 13918457048")
    monkeypatch.setattr(torch, "save", full_disk)

    def main():
        config.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)}, keep_previous=True)
    with pytest.raises(SystemExit) as e:
        config.run_cli(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {path}: could not be written")
    assert f"the previous {path} is intact" in err[0] and "GiB free" in err[0]
    assert open(path, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["diffusion.pt"]   # no temp file


# --- bad input at every entry point: one error line, exit status 2, the run folder untouched -------------

def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under folder: what a refused command must leave as it was."""
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_base):
    """Files a user could hand the scripts by mistake, made once: blank and malformed prompt files, a zero-byte
    and a single reference image, a CLIP folder with a corrupt model.safetensors and one with a bad config.json,
    a VAE folder whose config.json lacks its channels."""
    from PIL import Image
    from conftest import make_clip_folder
    d = tmp_path_factory.mktemp("bad")
    (d / "blank.txt").write_text("\n  \n\n")
    (d / "bad.jsonl").write_text('{"text": "a red circle"}\n{not json\n')
    (d / "zero").mkdir()
    (d / "zero" / "a.png").write_bytes(b"")
    Image.new("RGB", (32, 32)).save(d / "zero" / "b.png")
    (d / "one").mkdir()
    Image.new("RGB", (32, 32)).save(d / "one" / "a.png")
    clip, _, _ = make_clip_folder(d, ["red", "circle"])
    for name, broken in (("clip_corrupt", "model.safetensors"), ("clip_badjson", "config.json")):
        import shutil
        shutil.copytree(clip, d / name)
        (d / name / broken).write_bytes(b"\x00garbage{")
    (d / "vae_nochannels").mkdir()
    (d / "vae_nochannels" / "config.json").write_text("{}")
    return d


BAD_INPUTS = [  # (script, argv; {b}: the bad-inputs folder, {o}: a copy of a trained tiny run), message
    ("train", "--stage diffusion --prompts {b}/blank.txt", "--prompts {b}/blank.txt: no prompts in it"),
    ("train", "--stage diffusion --prompts {b}/bad.jsonl", "--prompts {b}/bad.jsonl: line 2 is not JSON"),
    ("train", "--stage diffusion --text_encoder {b}/nowhere", "--text_encoder {b}/nowhere: no such folder"),
    ("train", "--stage vae --preset md --vgg_weights {b}/vgg16.pth", "--vgg_weights {b}/vgg16.pth: no such file"),
    ("train", "--stage ufogen --init_from {b}/nowhere.pt", "--init_from {b}/nowhere.pt: no such file or folder"),
    ("train", "--stage diffusion --text_encoder {b}/clip_corrupt", "clip_corrupt/model.safetensors: not a readable "
                                                                   "safetensors file"),
    ("train", "--stage diffusion --text_encoder {b}/clip_badjson", "clip_badjson/config.json: not JSON"),
    ("train", "--stage diffusion --vae_diffusers {b}/vae_nochannels", "vae_nochannels/config.json: no "
                                                                      "block_out_channels"),
    ("sample", "--ckpt {o}/diffusion.pt --prompt x --guidance nan", "--guidance nan: expected a finite number"),
    ("sample", "--diffusers {b}/nowhere --prompt x", "{b}/nowhere: no such folder"),
    ("sample", "--diffusers {b} --prompt x", "not a diffusers Stable Diffusion pipeline folder"),
    ("evaluate", "--ckpt {o}/diffusion.pt --prompts {b}/blank.txt", "no prompts in it"),
    ("evaluate", "--ckpt {o}/diffusion.pt --ref_dir {b}/zero --n 2", "zero/a.png: not a readable image"),
    ("evaluate", "--ckpt {o}/diffusion.pt --ref_dir {b}/one --n 2", "1 image; a Frechet distance needs at least 2"),
    ("export_coreml", "--ckpt {o}/diffusion.pt --components bogus --out {o}/exp", "unknown 'bogus'"),
    ("export_coreml", "--ckpt {o}/diffusion.pt --repeats 0 --out {o}/exp", "--repeats 0: expected >= 1"),
    ("export_coreml", "--ckpt {o}/diffusion.pt --threads 0 --out {o}/exp", "--threads 0: expected >= 1"),
    ("export_coreml", "--ckpt {o}/diffusion.pt --target iOS99 --out {o}/exp", "--target 'iOS99': not a Core ML "
                                                                              "deployment target"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script, argv, named", BAD_INPUTS, ids=[f"{s}:{a.split()[1]}" for s, a, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_changes_nothing(script, argv, named, bad_inputs, tiny_base, tmp_path,
                                                         capsys):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(tiny_base, out)
    before = snapshot(out)
    args = argv.format(b=bad_inputs, o=out).split()
    fresh = tmp_path / "fresh"                                      # train.py: a new run, on the trained VAE
    if script == "train":
        args += ["--out_dir", str(fresh), "--vae_ckpt", str(out / "vae.pt"), "--steps", "1", "--eval_images", "2"]
    main = {"train": train.main, "sample": S.main, "evaluate": ev.main, "export_coreml": export_coreml.main}[script]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        config.run_cli(lambda: main(args))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    # run_cli's "error: ..." or argparse's usage + "prog: error: ..." (flag validation), never a traceback
    assert e.value.code == 2 and err and "error: " in err[-1], err
    assert named.format(b=bad_inputs) in err[-1], err[-1]
    assert sum("error:" in line for line in err) == 1 and not any("Traceback" in line for line in err), err
    assert snapshot(out) == before                                  # nothing written, nothing changed
    assert not fresh.exists() or not snapshot(fresh), snapshot(fresh).keys()


@pytest.mark.slow
def test_a_killed_run_leaves_a_loadable_checkpoint_and_resumes(tmp_path):
    """SIGKILL in the middle of a run (possibly mid-write): the checkpoint on disk loads, the temp file of the
    killed writer is removed by the next run, and --resume finishes the stage."""
    import signal
    import time
    out = tmp_path / "kill"
    cmd = [sys.executable, "train.py", "--stage", "vae", "--steps", "400", "--ckpt_every", "3", "--out_dir", str(out),
           *COMMON]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "vae.pt").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = config.load_checkpoint(str(out / "vae.pt"))                 # whatever moment it died at
    assert 3 <= ck["step"] < 400 and config.non_finite(ck) is None
    r = run_script("train.py", "--stage", "vae", "--steps", str(ck["step"] + 3), "--ckpt_every", "3",
                   "--out_dir", str(out), "--resume", "true", *COMMON)
    assert r.returncode == 0, r.stderr[-2000:]
    assert config.load_checkpoint(str(out / "vae.pt"))["step"] == ck["step"] + 3
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and not (out / "run.lock").exists()


@pytest.mark.slow
def test_a_read_only_folder_is_one_error_line(tmp_path, monkeypatch, capsys, tiny_base):
    """A read-only (or forbidden, or full) out_dir: train.py and evaluate.py end with one line naming the folder.
    (Tests run as root here, whom chmod does not stop, so the file system's refusal is simulated.)"""
    import errno
    ro = tmp_path / "ro"
    real = os.makedirs

    def refuse(path, *a, **k):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "makedirs", refuse)
    for main, argv in ((train.main, ["--stage", "vae", "--steps", "1", "--out_dir", str(ro / "run")]),
                       (ev.main, ["--ckpt", str(tiny_base / "diffusion.pt"), "--n", "2",
                                  "--out_dir", str(ro / "eval")])):
        with pytest.raises(SystemExit) as e:
            config.run_cli(lambda: main(argv))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "Read-only file system" in err[0] and str(ro) in err[0], err
        assert "the files already there are as they were" in err[0]


@pytest.mark.slow
def test_a_damaged_image_in_a_resumed_generation_is_made_again(tiny_base, tmp_path, capsys):
    pipe = S.Pipeline.from_checkpoint(str(tiny_base / "diffusion.pt"))
    prompts, folder = ["a red circle on a blue background", "a green square on a white background"], tmp_path / "gen"
    paths = ev.generate(pipe, prompts, str(folder), batch=1, steps=2)
    first = open(paths[0], "rb").read()
    open(paths[0], "wb").close()                                    # zero bytes, as a full disk or a tool leaves it
    ev.generate(pipe, prompts, str(folder), batch=1, steps=2)
    assert open(paths[0], "rb").read() == first and "not a readable image; generating it again" in capsys.readouterr().out


@pytest.mark.slow
def test_fewer_images_than_the_batch_is_said(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "two"
    folder.mkdir()
    for i, c in enumerate(((255, 0, 0), (0, 0, 255))):                # one trains, the last is held out
        Image.new("RGB", (40, 40), c).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a square")
    train.main(["--stage", "vae", "--data", str(folder), "--steps", "1", "--batch_size", "8",
                "--out_dir", str(tmp_path / "run"), *COMMON[2:]])
    assert "vae: note: the training set has 1 item(s), fewer than --batch_size 8" in capsys.readouterr().out
