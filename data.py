"""
Data for every training stage.

- Shapes: a synthetic captioned dataset, generated procedurally and deterministically from an index (no
  files, no downloads): one shape (circle, square, triangle) of a colour on a background colour, near the
  centre at a random size, captioned "a red circle on a blue background". Some (shape, colour,
  background) combinations are held out of training (split="heldout") so that generalisation to unseen
  combinations of seen attributes can be measured.
- check_attributes: reads shape, colour and background back from pixels, analytically (no learned
  weights): the tiny run's quality metric.
- ImageFolder: real data, as diffusers' train_text_to_image.py lays it out (metadata.jsonl with
  file_name/text) or as image + same-name .txt caption sidecars; resized and centre-cropped.

Images are float tensors (3, H, W) in [-1, 1]; a dataset item is (image, caption).
"""

import json
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ----------------------------------------------------------------------------------------------------
# Synthetic captioned shapes
# ----------------------------------------------------------------------------------------------------

COLORS = {                        # RGB; far apart so that the checker's nearest-colour reading is unambiguous
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
STYLES = ("plain", "outlined")    # "outlined": the style variant for the §5.4 style-LoRA experiments
HOLE = 0.5                        # outlined: the shape with a hole of HOLE x its size cut out (a thick outline)
# The toy's geometry (the ablations: docs/results.md, "The toy geometry"):
RADIUS = (0.3, 0.4)               # shape radius range, in image sides: 10-13 px at 32 px, 5-7 cells of the 8x8
                                  # latent, like the objects the paper's 16x16 bottleneck sees many cells wide
JITTER = 0.03                     # the centre's offset from the image centre, at most (image sides; +-1 px at
                                  # 32 px). A caption then fixes its image up to size, and a model of minutes
                                  # draws it crisp; anywhere in the image, every position's average is a blob
SQUARE = 1.0                      # the square's half-side, in radii: it fills the circle's bounding box, so
                                  # the two differ by 4.5 px corners


def all_combos():
    return [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]


def heldout_combos():
    """Every 10th combination in a fixed shuffled order: 9 of 90. Each held-out triple's attributes, and each
    of its pairs (shape+colour, colour+background, ...), still appear in training."""
    combos = all_combos()
    random.Random(0).shuffle(combos)
    return sorted(combos[::10])


def caption(shape: str, color: str, background: str, style: str = "plain") -> str:
    text = f"a {color} {shape} on a {background} background"
    return text if style == "plain" else f"{text} in {style} style"


def parse_caption(text: str) -> dict:
    """The attributes a caption asks for (inverse of `caption`)."""
    words = text.replace(",", " ").split()
    try:
        color, shape = words[1], words[2]
        background = words[words.index("on") + 2]
    except (IndexError, ValueError):
        raise ValueError(f"caption {text!r} is not of the form 'a <color> <shape> on a <color> background'")
    return {"shape": shape, "color": color, "background": background}


def shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """1 inside the shape, 0 outside; dx, dy: coordinates relative to its centre in units of its radius."""
    if shape == "circle":
        mask = dx.square() + dy.square() <= 1.0
    elif shape == "square":
        mask = torch.maximum(dx.abs(), dy.abs()) <= SQUARE
    elif shape == "triangle":                                        # apex up: y from -1 (apex) to 0.5 (base)
        mask = (dy <= 0.5) & (dx.abs() <= 0.866 * (dy + 1.0) / 1.5)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return mask.float()


def render(shape, color, background, cx, cy, r, resolution, style="plain", supersample=4) -> torch.Tensor:
    """One image (3, R, R) in [-1, 1]; centre (cx, cy) and radius r in units of the image side.
    Rendered at `supersample` x resolution and box-filtered, so edges are anti-aliased like a photo's."""
    n = resolution * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    mask = shape_mask(shape, (x - cx) / r, (y - cy) / r)
    if style == "outlined":                                          # a thick outline: the same shape, scaled
        # by HOLE about its centre, cut out. Coarse on purpose: the ring is 6-10 px wide at 64 px, about a
        # latent cell of the 8x VAE, which codes it without having seen one (thin stripes came back as a blur).
        mask = mask * (1 - shape_mask(shape, (x - cx) / (HOLE * r), (y - cy) / (HOLE * r)))
    fg = torch.tensor(COLORS[color], dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    bg = torch.tensor(COLORS[background], dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    img = bg + (fg - bg) * mask                                      # (3, n, n)
    return F.avg_pool2d(img[None], supersample)[0]                   # (3, R, R)


class Shapes(torch.utils.data.Dataset):
    """Deterministic synthetic (image, caption) pairs: item i is always the same picture.
    split: "train" (the 81 training combinations), "heldout" (the 9 held-out ones), or "all".
    style: "plain", "outlined", or "mixed" (half of each; captions say which)."""

    def __init__(self, split: str = "train", resolution: int = 64, size: int = 100_000, seed: int = 0,
                 style: str = "plain"):
        held = set(heldout_combos())
        if split == "train":
            self.combos = [c for c in all_combos() if c not in held]
        elif split == "heldout":
            self.combos = sorted(held)
        elif split == "all":
            self.combos = all_combos()
        else:
            raise ValueError(f"Shapes split = {split!r}, expected 'train', 'heldout' or 'all'")
        if style not in STYLES + ("mixed",):
            raise ValueError(f"Shapes style = {style!r}, expected one of {STYLES + ('mixed',)}")
        self.resolution, self.size, self.seed, self.style = resolution, size, seed, style
        self.offset = {"train": 0, "heldout": 10**9, "all": 2 * 10**9}[split]   # disjoint random streams

    def __len__(self):
        return self.size

    def attributes(self, i: int) -> dict:
        rng = random.Random(self.seed * 10**10 + self.offset + i)
        shape, color, background = self.combos[rng.randrange(len(self.combos))]
        r = rng.uniform(*RADIUS)                                     # radius, in image sides
        off = min(JITTER, 0.46 - r)                                  # keep clear of the border (checker reads bg there)
        style = self.style if self.style != "mixed" else STYLES[rng.randrange(2)]
        return dict(shape=shape, color=color, background=background, style=style,
                    cx=0.5 + rng.uniform(-off, off), cy=0.5 + rng.uniform(-off, off), r=r)

    def __getitem__(self, i: int):
        a = self.attributes(i)
        img = render(a["shape"], a["color"], a["background"], a["cx"], a["cy"], a["r"], self.resolution, a["style"])
        return img, caption(a["shape"], a["color"], a["background"], a["style"])


# ----------------------------------------------------------------------------------------------------
# The attribute checker (analytic)
# ----------------------------------------------------------------------------------------------------

_PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 127.5 - 1     # (6, 3)
_NAMES = list(COLORS)


def nearest_color(rgb: torch.Tensor) -> str:
    return _NAMES[int((_PALETTE - rgb.view(1, 3)).square().sum(1).argmin())]


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected region of a boolean mask (H, W): every pixel takes the highest label among its
    neighbours in the mask until nothing changes, then the most common label wins."""
    h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w) * mask
    for _ in range(h * w):
        grown = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    counts = torch.bincount(labels.long().flatten(), minlength=2)
    counts[0] = 0                                                   # 0: not in the mask
    return labels == counts.argmax()


def check_attributes(img: torch.Tensor) -> dict:
    """Read shape, colour, background (and whether it is outlined) back from an image (3, H, W) in [-1, 1].
    background: the median colour of a 2-pixel border (shapes keep clear of it).
    colour: the median of pixels far from the background colour (the shape), nearest palette colour.
    shape: the template (square, circle, apex-up triangle, each inscribed in the shape's bounding box) with the
           highest IoU with the filled shape. Robust to a soft edge, which is what a decoder draws: 32 px shapes
           blurred by a Gaussian of sigma 1 px read 98% (a threshold on the fraction of the box filled has no
           margin at 32 px, where a circle fills 0.71-0.86 of its box from pixel rounding alone).
    style: outlined if 5% or more of the filled shape (holes filled) is background: the outline's hole is
           HOLE^2 = 25% of it; decoded by the tiny VAE, 10-27%; a plain shape, decoded or not, has none."""
    img = img.float().clamp(-1, 1)
    h, w = img.shape[-2:]
    border = torch.cat([img[:, :2].flatten(1), img[:, -2:].flatten(1), img[:, :, :2].flatten(1),
                        img[:, :, -2:].flatten(1)], dim=1)                               # (3, n)
    bg_rgb = border.median(dim=1).values
    dist = (img - bg_rgb.view(3, 1, 1)).square().sum(0).sqrt()                          # (H, W)
    mask = dist > 0.5                                                                   # clearly not background
    if mask.sum() < 4:
        return {"shape": None, "color": None, "background": nearest_color(bg_rgb), "style": None}
    fg_rgb = img[:, mask].median(dim=1).values
    # Then the shape is what is closer to its colour than to the background's (a decoded outline's hole is
    # a blur of both colours; by distance alone it would count as shape).
    mask = (img - fg_rgb.view(3, 1, 1)).square().sum(0) < (img - bg_rgb.view(3, 1, 1)).square().sum(0)
    mask = largest_component(mask)        # stray specks a decoder leaves in the background are not the shape
    # Fill holes: background that cannot be reached from the image border is inside the shape. An outlined
    # shape fills back to the plain one, so shape reads the same in both styles.
    outside = torch.zeros_like(mask)
    outside[[0, -1], :], outside[:, [0, -1]] = True, True
    outside &= ~mask
    for _ in range(h + w):                                       # flood fill, one 3x3 dilation per pass
        grown = F.max_pool2d(outside.float()[None, None], 3, 1, 1)[0, 0].bool() & ~mask
        if torch.equal(grown, outside):
            break
        outside = grown
    closed = ~outside                                                                   # (H, W) the filled shape
    ys, xs = torch.nonzero(closed, as_tuple=True)
    y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    dx, dy = (xx - (x0 + x1) / 2) / ((x1 - x0) / 2), (yy - (y0 + y1) / 2) / ((y1 - y0) / 2)   # box: [-1, 1]^2
    templates = {"square": (dx.abs() <= 1) & (dy.abs() <= 1), "circle": dx.square() + dy.square() <= 1,
                 "triangle": (dy <= 1) & (dx.abs() <= (dy + 1) / 2)}                   # apex at the box's top
    iou = {k: (t & closed).sum().item() / (t | closed).sum().item() for k, t in templates.items()}
    shape = max(iou, key=iou.get)
    outlined = mask.sum().item() < 0.95 * closed.sum().item()
    return {"shape": shape, "color": nearest_color(fg_rgb), "background": nearest_color(bg_rgb),
            "style": "outlined" if outlined else "plain"}


def caption_style(text: str) -> str:
    """The style a caption asks for: "... in outlined style" -> "outlined"; no style phrase -> "plain"."""
    words = text.split()
    return words[-2] if len(words) > 2 and words[-1] == "style" and words[-3] == "in" else "plain"


def attribute_accuracy(images: torch.Tensor, captions: list[str]) -> dict:
    """Fraction of images whose checked shape / colour / background / style match their captions."""
    hits = {"shape": 0, "color": 0, "background": 0, "style": 0}
    for img, text in zip(images, captions):
        want, got = {**parse_caption(text), "style": caption_style(text)}, check_attributes(img)
        for k in hits:
            hits[k] += want[k] == got[k]
    return {k: v / max(len(captions), 1) for k, v in hits.items()}


# ----------------------------------------------------------------------------------------------------
# Real data: an image folder; the training order of any dataset
# ----------------------------------------------------------------------------------------------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image(path: str, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bicubic), centre-crop, -> (3, R, R) in [-1, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        s = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))),
                       Image.BICUBIC)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


class ImageFolder(torch.utils.data.Dataset):
    """Captioned images from a folder: `metadata.jsonl` lines {"file_name": ..., "text": ...} (diffusers'
    layout), else every image with a same-name .txt sidecar (a missing sidecar means an empty caption,
    which classifier-free guidance training uses anyway). An image that cannot be read is skipped (the
    next one is used) and counted in `self.skipped`, so a long run never dies on one bad file."""

    def __init__(self, root: str, resolution: int):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist")
        self.root, self.resolution, self.skipped = root, resolution, 0
        meta = os.path.join(root, "metadata.jsonl")
        items = []
        if os.path.isfile(meta):
            with open(meta) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        items.append((os.path.join(root, rec["file_name"]), str(rec.get("text", ""))))
                    except (json.JSONDecodeError, KeyError) as e:
                        raise ValueError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}}, got {line.strip()[:80]!r} ({e})")
        else:
            for name in sorted(os.listdir(root)):
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_EXTS:
                    txt = os.path.join(root, stem + ".txt")
                    text = open(txt).read().strip() if os.path.isfile(txt) else ""
                    items.append((os.path.join(root, name), text))
        self.items = [(p, t) for p, t in items if os.path.isfile(p)]
        if not self.items:
            raise ValueError(f"data folder {root!r} has no usable images (looked for metadata.jsonl, "
                             f"or {'/'.join(IMAGE_EXTS)} files)")
        if len(self.items) < len(items):
            print(f"data: {len(items) - len(self.items)} files listed in {meta} are missing; skipped")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int):
        for k in range(len(self.items)):
            path, text = self.items[(i + k) % len(self.items)]
            try:
                return load_image(path, self.resolution), text
            except Exception as e:                               # corrupt / truncated / not an image
                self.skipped += 1
                print(f"data: skipping unreadable image {path} ({type(e).__name__}: {e}); {self.skipped} skipped so far")
        raise ValueError(f"data folder {self.root!r}: none of its {len(self.items)} images could be read")


class Latents(torch.utils.data.Dataset):
    """A fixed training set kept as VAE latents: item i is (latent (c, h, w), caption) (train.encode_dataset)."""

    def __init__(self, latents: torch.Tensor, captions: list[str]):
        self.latents, self.captions = latents, captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.latents[i], self.captions[i]


def make_dataset(data: str, split: str, resolution: int, style: str = "plain"):
    """'shapes' -> the synthetic dataset; anything else is an image folder path."""
    if data == "shapes":
        return Shapes(split, resolution, style=style)
    return ImageFolder(data, resolution)


def batches(dataset, batch_size: int, grad_accum: int, seed: int, rank: int, world: int, start_step: int, device: str,
            num_workers: int = 0):
    """Yields this process's micro-batches, (images, captions), for optimizer steps start_step, start_step+1, ...
    (batch_size: the global batch per optimizer step, over `world` processes and `grad_accum` micro-steps).
    The global order is a fixed function of (seed, step): a permutation of the dataset per epoch, step s
    taking the s-th slice of batch_size; process r takes its contiguous part. So a resumed run, a run on
    2 processes and a run on 1 process with the doubled batch all see the same images at the same step."""
    n, per_proc = len(dataset), batch_size // world
    micro = per_proc // grad_accum
    step = start_step

    perms = {}                                                    # epoch -> permutation (cached)

    def indices(s):
        first = s * batch_size + rank * per_proc
        out = []
        for g in range(first, first + per_proc):
            epoch, k = divmod(g, n)
            if epoch not in perms:
                perms.clear()
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            out.append(int(perms[epoch][k]))
        return out

    def collate(items):
        return torch.stack([im for im, _ in items]), [t for _, t in items]

    while True:
        idx = indices(step)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=micro,
                                             num_workers=num_workers, collate_fn=collate)
        for images, texts in loader:
            yield images.to(device, non_blocking=True), texts
        step += 1


# ----------------------------------------------------------------------------------------------------
# Pictures out
# ----------------------------------------------------------------------------------------------------

def to_pil(img: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    arr = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> Image.Image:
    """(N, 3, H, W) in [-1, 1] -> one PIL image, `nrow` images per row, white gutters."""
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(to_pil(img), (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
    return grid


# ----------------------------------------------------------------------------------------------------
# A quality number that needs no download: Frechet distance on pixel features
# ----------------------------------------------------------------------------------------------------

def pixel_features(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3*size*size): area-averaged thumbnails. Colour, position and coarse shape
    survive at 8x8, which is what the synthetic data varies; no pretrained network is involved."""
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets
    (Heusel et al. 2017, the FID formula). Tr((S_a S_b)^(1/2)) is computed exactly as the sum of square roots
    of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric PSD (no complex sqrtm needed)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)
