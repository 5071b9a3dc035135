"""evaluate.py: the Frechet distance against closed forms, resumable generation, clear messages for missing
optional packages and weights, and the --paper_tables report on an empty run folder."""

import json
import os
import sys

import numpy as np
import pytest
import torch

import data
import evaluate as ev
import md
import report
import sample as S
import train


def exact_gaussian_sample(n, mean, cov, seed):
    """n points whose sample mean and (unbiased) sample covariance are exactly `mean` and `cov`."""
    x = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T       # sample covariance = I
    return x @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_closed_forms():
    d = torch.tensor
    a = exact_gaussian_sample(500, d([0.0, 0.0]), d([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64), 0)
    assert abs(data.frechet_distance(a, a)) < 1e-9                           # identical Gaussians
    # N((0,0), diag(1,4)) vs N((3,4), diag(9,1)): |mu|^2 + tr(S1 + S2) - 2 tr((S1 S2)^1/2) = 25 + 15 - 2(3 + 2) = 30
    b = exact_gaussian_sample(700, d([3.0, 4.0]), d([[9.0, 0.0], [0.0, 1.0]], dtype=torch.float64), 1)
    assert abs(data.frechet_distance(a, b) - 30.0) < 1e-6
    # Full (non-diagonal) covariances: rotating both Gaussians by the same R leaves the distance unchanged,
    # so N(0, R S R^T) vs N(0, R T R^T) is 0 + 15 - 2 * tr((S T)^1/2) = 15 - 2 * (3 + 2) = 5.
    r = d([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    s, t = d([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64), d([[9.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    c = exact_gaussian_sample(600, d([0.0, 0.0]), r @ s @ r.T, 2)
    e = exact_gaussian_sample(600, d([0.0, 0.0]), r @ t @ r.T, 3)
    assert abs(data.frechet_distance(c, e) - 5.0) < 1e-6


class CountingPipe:
    """A stand-in pipeline: image = a constant colour from the seed; counts the prompts it generated."""
    resolution = 16

    def __init__(self):
        self.calls = 0

    def images(self, prompts, seed=0, **kw):
        self.calls += len(prompts)
        g = torch.Generator().manual_seed(seed)
        return torch.rand(len(prompts), 3, 1, 1, generator=g).expand(-1, -1, 16, 16) * 2 - 1


def test_generation_resumes_without_redoing_finished_images(tmp_path):
    prompts = [f"p{i}" for i in range(10)]
    pipe = CountingPipe()
    paths = ev.generate(pipe, prompts, str(tmp_path), batch=4, seed=7)
    assert pipe.calls == 10 and all(os.path.isfile(p) for p in paths)
    first = {p: open(p, "rb").read() for p in paths}
    mtimes = {p: os.path.getmtime(p) for p in paths}
    os.remove(paths[5])                                                      # an interrupted run: batch 4..7
    pipe2 = CountingPipe()
    ev.generate(pipe2, prompts, str(tmp_path), batch=4, seed=7)
    assert pipe2.calls == 4                                                  # only that batch is generated again
    assert open(paths[5], "rb").read() == first[paths[5]]                    # and reproduced exactly
    assert all(os.path.getmtime(p) == mtimes[p] for p in paths if p != paths[5])
    pipe3 = CountingPipe()
    ev.generate(pipe3, prompts, str(tmp_path), batch=4, seed=7)
    assert pipe3.calls == 0
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_missing_packages_and_weights_are_named(tmp_path, monkeypatch):
    img = tmp_path / "a.png"
    data.to_pil(torch.zeros(3, 8, 8)).save(img)
    with pytest.raises(SystemExit, match=ev.INCEPTION_FILE):
        ev.inception_features([str(img)], None)
    weights = tmp_path / ev.INCEPTION_FILE
    weights.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)                 # simulate: not installed
    with pytest.raises(SystemExit, match="pip install torch-fidelity"):
        ev.inception_features([str(img)], str(weights))
    with pytest.raises(SystemExit, match="--clip_weights"):
        ev.clip_score([str(img)], ["x"], "ViT-g-14", None)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(SystemExit, match="pip install open_clip_torch"):
        ev.clip_score([str(img)], ["x"], "ViT-g-14", str(weights))


def test_read_prompts_and_bad_input(tmp_path):
    (tmp_path / "c.txt").write_text("a red circle\n\na blue square\n")
    assert ev.read_prompts(str(tmp_path / "c.txt")) == ["a red circle", "a blue square"]
    (tmp_path / "m.jsonl").write_text(json.dumps({"file_name": "1.png", "text": "t1"}) + "\n" +
                                      json.dumps({"file_name": "2.png", "caption": "t2"}) + "\n")
    assert ev.read_prompts(str(tmp_path / "m.jsonl")) == ["t1", "t2"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"file_name": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 2 has no 'text'"):
        ev.read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        ev.read_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        ev.main(["--ckpt", str(tmp_path / "missing.pt")])
    with pytest.raises(FileNotFoundError, match="no images"):
        ev.list_images(str(tmp_path))


@pytest.mark.slow
def test_paper_tables_on_an_empty_run_says_what_was_not_run(tmp_path):
    text = report.paper_tables(str(tmp_path / "run"), str(tmp_path / "report"), eval_images=4, litert=False)
    assert "not run: no" in text and "diffusion.pt" in text and "python report.py --table5" in text
    assert "python report.py --plugins" in text
    assert "quoted (paper, 512px)" in text and "measured" in text                 # Table 1, both kinds of rows
    assert "| torch |" in text and "quoted, paper Table 4" in text
    assert json.load(open(tmp_path / "report" / "table4.json"))["torch"]["steps"] == 1
    assert (tmp_path / "report" / "report.md").read_text().strip() == text.strip()


@pytest.mark.slow
def test_guidance_sweep_one_point_per_scale(tiny_base, tmp_path):
    """5.2's curve: every scale sampled on the same prompts and seeds; scale 1 is plain conditional sampling and
    another scale gives other images; the table, JSON and plot are written."""
    ckpt = str(tiny_base / "diffusion.pt")
    rows = ev.main(["--ckpt", ckpt, "--guidance", "1,4", "--n", "4", "--batch", "4", "--out_dir", str(tmp_path)])
    assert [r["guidance_scale"] for r in rows] == [1.0, 4.0]
    assert all({"color", "background", "shape", "fd_pixels"} <= set(r) for r in rows)
    pipe = S.Pipeline.from_checkpoint(ckpt)
    prompts = ev.heldout_prompts(train.TrainConfig(), 4)
    want = pipe.images(prompts, seed=0, steps=50, guidance_scale=1.0, sampler="ddim")
    got = ev.load_folder(sorted(str(p) for p in (tmp_path / "eval_ddim50_cfg1").glob("*.png"))).float() / 127.5 - 1
    assert (got - want.clamp(-1, 1)).abs().max() < 2 / 255 + 1e-6                   # PNG rounding only
    other = ev.load_folder(sorted(str(p) for p in (tmp_path / "eval_ddim50_cfg4").glob("*.png")))
    assert not torch.equal(other, ev.load_folder(sorted(str(p) for p in (tmp_path / "eval_ddim50_cfg1").glob("*.png"))))
    saved = json.load(open(tmp_path / "guidance_ddim50.json"))
    assert [r["guidance_scale"] for r in saved["rows"]] == [1.0, 4.0]
    assert (tmp_path / "guidance_ddim50.md").read_text().count("\n") == 4 and (tmp_path / "guidance_ddim50.png").is_file()
    with pytest.raises(ValueError, match="--guidance 'a,b'"):
        ev.main(["--ckpt", ckpt, "--guidance", "a,b"])


@pytest.mark.slow
def test_generation_folder_of_another_run_is_refused_or_regenerated(tiny_base, tmp_path):
    """An image folder remembers its run (checkpoint hash, seed, sampler, prompts): evaluating another seed into it
    is refused, naming the field, and --overwrite regenerates instead of reporting the old images."""
    ckpt = str(tiny_base / "diffusion.pt")
    common = ["--ckpt", ckpt, "--n", "2", "--batch", "2", "--sampler", "onestep", "--out_dir", str(tmp_path)]
    first = ev.main(common)
    before = ev.load_folder([str(tmp_path / f"{i:07d}.png") for i in range(2)])
    assert ev.main(common)["color"] == first["color"]                              # same run: resumed, reused
    with pytest.raises(ValueError, match=r"seed: folder 0 vs now 5.*--overwrite"):
        ev.main(common + ["--seed", "5"])
    with pytest.raises(ValueError, match="sampling"):
        ev.main(common[:-4] + ["--sampler", "eight_step", "--out_dir", str(tmp_path)])
    assert torch.equal(ev.load_folder([str(tmp_path / f"{i:07d}.png") for i in range(2)]), before)   # nothing lost
    ev.main(common + ["--seed", "5", "--overwrite"])
    after = ev.load_folder([str(tmp_path / f"{i:07d}.png") for i in range(2)])
    assert not torch.equal(after, before)
    assert json.load(open(tmp_path / "fingerprint.json"))["seed"] == 5


def test_throughput_report_by_hand(tmp_path, monkeypatch):
    """images/s = steps x batch / seconds; GFLOP/s = FLOPs per image x images/s; fraction of the (here fixed)
    matmul peak; each stage's row kept in times.json."""
    from types import SimpleNamespace
    monkeypatch.setitem(ev._PEAK, "cpu", 100.0)
    r = ev.throughput_report(SimpleNamespace(stage="vae", batch_size=16, out_dir=str(tmp_path)), 50, 10.0, 1e9, "cpu")
    assert r["images_per_s"] == 80 and r["gflop_per_s"] == 80 and r["peak_fraction"] == 0.8 and r["minutes"] == 10 / 60
    ev.throughput_report(SimpleNamespace(stage="distill", batch_size=4, out_dir=str(tmp_path)), 3, 2.0, 5e8, "cpu")
    times = json.load(open(tmp_path / "times.json"))
    assert set(times) == {"vae", "distill"} and times["distill"]["images_per_s"] == 6 and times["vae"] == r
    assert ev.matmul_peak("cpu") == 100.0


def test_vae_report_reads_reconstructions_with_the_checker(tmp_path):
    """A perfect autoencoder reconstructs every attribute (checker 1.0), a constant one none of the shapes."""
    from types import SimpleNamespace

    class Fake(torch.nn.Module):
        def __init__(self, constant):
            super().__init__()
            self.w, self.constant, self.cfg = torch.nn.Parameter(torch.zeros(1)), constant, SimpleNamespace(scaling_factor=1.0)

        def encode(self, x):
            return SimpleNamespace(mode=lambda: x)

        def decode(self, z):
            return torch.zeros_like(z) + z.mean((0, 2, 3), keepdim=True) if self.constant else z

    cfg = SimpleNamespace(data="shapes", resolution=32, eval_images=16, out_dir=str(tmp_path), stage="vae", steps=1)
    perfect = ev.vae_report(cfg, Fake(False), 0.1, "cpu")
    assert perfect["checker"] == {"shape": 1.0, "color": 1.0, "background": 1.0} and perfect["psnr_heldout_db"] > 100
    flat = ev.vae_report(cfg, Fake(True), 0.1, "cpu")
    assert flat["checker"]["shape"] < 0.5 and flat["psnr_heldout_db"] < 20
    assert json.load(open(tmp_path / "vae_eval.json"))["checker"] == flat["checker"]


def test_ablation_statistics_by_hand():
    """mean ± sample std over seeds; a row differs from the design when its seed-by-seed difference passes a
    paired t-test at 95%: |mean d| > t(0.975, k - 1) x std(d) / sqrt(k), by hand for k = 3 (t = 4.303)."""
    assert report.mean_spread([0.5, 0.7]) == "0.600 ± 0.141"
    assert report.mean_spread([0.25]) == "0.250 ± 0.000"
    mean, sd, least = report.paired([0.61, 0.70, 0.82], [0.60, 0.70, 0.80])       # d = 0.01, 0.00, 0.02
    assert (round(mean, 6), round(sd, 6), round(least, 6)) == (0.01, 0.01, round(4.303 * 0.01 / 3 ** 0.5, 6))
    assert report.paired([0.5], [0.4])[2] == float("inf")                           # one seed calls nothing
    assert round(report.binomial_se(0.6, 1024), 4) == 1.5309                        # 100 sqrt(0.6 x 0.4 / 1024)
    assert report.seeds_needed(0.036, 0.03) == "9"          # k = 8: 2.365 x 3.6 / sqrt 8 = 3.01; k = 9: 2.77
    assert report.seeds_needed(0.0, 0.03) == "2" and report.seeds_needed(float("nan"), 0.03) == "> 31"
    assert report.seeds_needed(0.2, 0.03) == "> 31"         # k = 31: 2.042 x 20 / sqrt 31 = 7.3
    ref = {("all", "shape"): [0.60, 0.70, 0.80], ("all", "fd"): [3.0, 3.2, 2.8]}    # seed std 0.1: wide
    same = {("all", "shape"): [0.61, 0.70, 0.82], ("all", "fd"): [3.1, 3.2, 2.95]}
    worse = {("all", "shape"): [0.55, 0.66, 0.74], ("all", "fd"): [4.0, 4.2, 3.8]}  # 5 points below, every seed
    assert report.ablation_verdict(same, ref, "3.2: x").startswith("shape same (+0.010 ± 0.010), Fréchet same")
    want = "shape worse (-0.050 ± 0.010), Fréchet worse (+1.000 ± 0.000); paper 3.2: x"
    assert report.ablation_verdict(worse, ref, "3.2: x") == want    # inside the rows' own spread, yet called


def test_ablation_rows_change_one_choice_each():
    """Each row's UNet differs from its preset's design in the fields it names (the md and tiny sizes alike)."""
    for name, fields, claim in report.ABLATIONS[1:]:
        for preset in ("md", "tiny"):
            cfg, design = report.ablation_config(preset, fields), report.ablation_config(preset, {})
            changed = {k for k, v in vars(cfg).items() if v != getattr(design, k)}
            assert changed and changed <= {"self_attn", "shared_kv", "ff_mult", "ff_act", "attn_act", "conv_type",
                                           "channels", "down_depth", "up_depth"}, (name, preset, changed)
        assert claim.split(":")[0] in ("3.2", "3.3")
    assert report.ablation_config("tiny", {}) == md.PRESETS["tiny"]                     # the toy trains softmax
    assert md.unet_cost(report.ablation_config("md", report.ABLATIONS[3][1]), 512)["params_m"] > \
        md.unet_cost(md.PRESETS["md"], 512)["params_m"]                                    # FF x4 costs params


def test_evaluation_seed_picks_the_initial_noise(tiny_base):
    """evaluate_t2i's batch from prompt i starts from the noise of seed + i: a call on prompts[2:] with seed 2
    makes the same images as the whole call's last two; another seed, other images (report.eval_noise's draws)."""
    pipe = S.Pipeline.from_checkpoint(str(tiny_base / "diffusion.pt"))
    prompts = ev.heldout_prompts(train.TrainConfig(), 4)
    kw = dict(batch=2, checker=False, steps=2, guidance_scale=3.0)
    _, whole = ev.evaluate_t2i(pipe, prompts, **kw)
    _, tail = ev.evaluate_t2i(pipe, prompts[2:], seed=2, **kw)
    _, other = ev.evaluate_t2i(pipe, prompts, seed=report.ABLATION_NOISE[0], **kw)
    assert torch.equal(whole[2:], tail) and (whole - other).abs().amax(dim=(1, 2, 3)).min() > 0.01


@pytest.mark.slow
def test_ablations_workers_run_side_by_side(tiny_base, tmp_path):
    """--workers 2: the runs go to 2 spawned processes with half the cores' threads each, the finetuned row's
    runs start from the design's run of their seed, and this process writes every result and the table."""
    out = tmp_path / "abl"
    text = report.main(["--ablations", "--quick", "--run_dir", str(tiny_base), "--out_dir", str(out), "--seeds", "2",
                        "--n", "4", "--rows", "6", "--workers", "2"])
    runs = json.load(open(out / "ablations.json"))["runs"]
    assert sorted(runs) == sorted(f"{report.ABLATIONS[i][0]} / seed {s}" for i in (0, 6) for s in (0, 1))
    assert {r["threads"] for r in runs.values()} == {max(1, os.cpu_count() // 2)}
    for s in (0, 1):
        assert S.saved_config(str(out / f"row6_seed{s}" / "relu.safetensors"))["unet"]["attn_act"] == "relu"
    assert "reference" in text and (out / "ablations.md").read_text().strip() == text.strip()


def test_ablations_steps_flag_sets_every_runs_budget(tiny_base, tmp_path, monkeypatch):
    """--ablations --steps 7: the first run (the design, seed 0) trains 7 steps at the budget's batch."""
    seen = []
    def stop(argv):
        seen.append(argv)
        raise KeyboardInterrupt                                  # enough: the flags of the first run
    monkeypatch.setattr(report.train, "main", stop)
    with pytest.raises(KeyboardInterrupt):
        report.main(["--ablations", "--steps", "7", "--run_dir", str(tiny_base), "--out_dir", str(tmp_path)])
    argv = seen[0]
    assert argv[argv.index("--steps") + 1] == "7" and argv[argv.index("--seed") + 1] == "0"
    assert argv[argv.index("--batch_size") + 1] == str(report.ABLATION_BUDGET["batch_size"])


@pytest.mark.slow
def test_ablations_quick_trains_each_row_and_resumes(tiny_base, tmp_path, monkeypatch):
    """report.py --ablations --quick on rows 0 (the design), 2 (separate K/V) and 6 (relu finetuned from row 0's
    runs), 2 seeds: each run trains the UNet its row names, the table has mean ± spread per row and says the rest
    were not run; a second call trains nothing (the results are kept) and writes the same table."""
    out = tmp_path / "abl"
    argv = ["--ablations", "--quick", "--run_dir", str(tiny_base), "--out_dir", str(out), "--seeds", "2", "--n", "4",
            "--rows", "2,6"]
    text = report.main(argv)
    runs = json.load(open(out / "ablations.json"))["runs"]
    names = [report.ABLATIONS[i][0] for i in (0, 2, 6)]
    assert sorted(runs) == sorted(f"{n} / seed {s}" for n in names for s in (0, 1))
    assert S.saved_config(str(out / "row2_seed1" / "diffusion.safetensors"))["unet"]["shared_kv"] is False
    assert S.saved_config(str(out / "row6_seed0" / "relu.safetensors"))["unet"]["attn_act"] == "relu"
    assert not (out / "row2_seed0" / "diffusion.pt").exists() and (out / "row0_seed0" / "diffusion.pt").exists()
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert "reference" in rows[names[0]] and "paper 3.2: setting W_K = W_V" in rows[names[1]]
    assert "not run" in rows[report.ABLATIONS[4][0]]
    r = [runs[f"{names[1]} / seed {s}"]["all"]["shape"] for s in (0, 1)]
    assert report.mean_spread(r) in rows[names[1]]
    a, b = ([runs[f"{n} / seed {s}"]["all"]["shape"] for s in (0, 1)] for n in names[:2])
    d = [b[0] - a[0], b[1] - a[1]]                          # the row minus the design, seed by seed, by hand
    want = f"({(d[0] + d[1]) / 2:+.3f} ± {abs(d[0] - d[1]) / 2 ** 0.5:.3f})"
    assert want.replace("-0.000", "+0.000") in rows[names[1]].replace("-0.000", "+0.000")
    assert "Resolution (shape, in points)" in text and "std of a row's difference from the design" in text
    noise = json.load(open(out / "ablations.json"))["eval_noise"]          # the design's seed 0, 3 noise draws
    assert len(noise["shape"]) == len(noise["fd"]) == 3 and noise["fd"][0] == runs[f"{names[0]} / seed 0"]["all"]["fd"]
    assert len(set(noise["fd"])) == 3                                      # other noise, other images
    assert f"{100 * np.std(noise['shape'], ddof=1):.1f} (std; Fréchet by {np.std(noise['fd'], ddof=1):.3f})" in text
    assert (out / "ablations.md").read_text().strip() == text.strip()
    monkeypatch.setattr(report.train, "main", lambda argv: pytest.fail("trained again"))
    def quality(t):                                                # every cell but the two timings (cols 3, 6)
        return [c[:3] + c[4:6] + c[7:] for c in (ln.split(" | ") for ln in t.splitlines() if ln.startswith("| "))]
    assert quality(report.main(argv)) == quality(text)
    kept = (out / "ablations.json").read_bytes()                 # another setting: refused, the runs kept
    with pytest.raises(ValueError, match=r"ablations.json: its runs were trained and read at .*'n': 4.*'n': 2"):
        report.main([*argv[:-4], "--n", "2", "--rows", "2,6"])
    assert (out / "ablations.json").read_bytes() == kept
    with pytest.raises(SystemExit):                              # --quick is its own budget
        report.main([*argv, "--steps", "5"])
